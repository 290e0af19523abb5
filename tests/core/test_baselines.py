"""The baselines' closed forms (SAFREE's projections, trigger rule and window; the windowed
conditioning), SAFREE on a real T5 text side (the toy's), and the windowed conditioning through both
samplers (the toy evaluation's and `VideoGenerator`'s): a window of 0 steps is the original prompt,
a window of every step the filtered one."""
import numpy as np
import pytest

from unlearn_jax.baselines import safree as S
from unlearn_jax.baselines.conditioning import Conditioning, thresholds, windowed, windowed_velocity
from repo_paths import TOY_WORLD


def test_projection_is_the_orthogonal_projection_onto_the_rows_span():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 7))
    rows = np.concatenate([rows, rows[:1] + 2 * rows[1:2]])  # rank 3 with a dependent row
    p = S.projection(rows)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(rows @ p, rows, atol=1e-12)
    assert round(np.trace(p)) == 3
    np.testing.assert_allclose(p, rows.T @ np.linalg.pinv(rows @ rows.T) @ rows, atol=1e-10)
    with pytest.raises(ValueError, match="rows must be"):
        S.projection(np.zeros((0, 4)))


def test_distances_and_the_trigger_rule():
    pc = S.projection(np.eye(4)[:2])           # the concept subspace: the first two axes
    v = np.array([[3.0, 4.0, 0, 0], [0, 0, 3.0, 4.0], [1.0, 0, 0, 2.0]])
    np.testing.assert_allclose(S.distances(v, pc), [0.0, 5.0, 2.0], atol=1e-12)
    # token i is a trigger when masking it leaves the prompt (1 + alpha) x farther than the others' mean
    assert S.trigger_tokens([1.0, 1.0, 1.0, 2.0], 0.01).tolist() == [False, False, False, True]
    assert S.trigger_tokens([1.0, 1.0, 1.02, 1.0], 0.01).tolist() == [False, False, True, False]
    assert not S.trigger_tokens([1.0, 1.0, 1.02, 1.0], 0.05).any()
    assert not S.trigger_tokens([5.0], 0.01).any()   # one token: nothing to compare with


def test_filtered_rows_leave_the_concept_subspace_and_the_others_are_kept():
    rng = np.random.default_rng(1)
    d = 6
    pc = S.projection(rng.normal(size=(2, d)))
    pin = S.projection(rng.normal(size=(4, d)))
    emb = rng.normal(size=(5, d)).astype(np.float32)   # 3 prompt tokens, the end token, one padding row
    out = S.filtered(emb, np.array([False, True, False]), pc, pin)
    np.testing.assert_array_equal(out[[0, 2, 3, 4]], emb[[0, 2, 3, 4]])
    np.testing.assert_allclose(out[1] @ pc, 0.0, atol=1e-5)            # no concept component left
    np.testing.assert_allclose(out[1], (emb[1] @ pin) - (emb[1] @ pin) @ pc, atol=1e-5)


def test_window_steps():
    e = np.eye(3)
    fixed = S.SafreeConfig(max_window=0.26)
    assert S.window_steps(e, e, 50, fixed) == 13                      # their video run: 13 of 50
    adaptive = S.SafreeConfig(max_window=0.2, adaptive=True)
    assert S.window_steps(e, e, 50, adaptive) == 0                    # nothing changed: no window
    assert S.window_steps(e, np.roll(e, 1, axis=1), 50, adaptive) == 10   # orthogonal: the whole window
    assert S.window_steps(e, -e, 50, adaptive) == 10


def test_windowed_velocity_switches_each_row_at_its_own_step():
    timesteps = np.array([900, 600, 300, 0])
    until = thresholds(timesteps, [0, 2, 4])
    np.testing.assert_array_equal(until, np.array([900, 300, -np.inf], np.float32))
    fn = windowed_velocity(lambda x, t, c: c)
    c = windowed(np.zeros((3, 1)), np.ones((3, 1)), until)   # early 0, late 1
    seen = np.stack([np.asarray(fn(None, np.full((3,), t), c))[:, 0] for t in timesteps])
    # row 0: no filtered step; row 1: the first two; row 2: every step
    np.testing.assert_array_equal(seen, [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="do not fall strictly"):
        thresholds([0, 300], [1, 1])


@pytest.fixture(scope="module")
def toy_text():
    from unlearn_jax import families

    return families.of_folder(TOY_WORLD).text(TOY_WORLD)


def test_token_encoder_ids_give_the_text_sides_encoding(toy_text):
    from unlearn_jax import families
    from repo_paths import ROOT

    prompts = ["a red circle moving up", "the ruby orb heading northward on a dark background"]
    te = toy_text.token_encoder()
    np.testing.assert_allclose(np.asarray(te.encode_ids(te.ids(prompts))), toy_text.encode(prompts), atol=1e-6)
    wan = ROOT / "assets" / "toy_world_wan"
    wan_text = families.of_folder(wan).text(wan)
    wte = wan_text.token_encoder()
    np.testing.assert_allclose(np.asarray(wte.encode_ids(wte.ids(prompts))), wan_text.encode(prompts), atol=1e-5)


def test_safree_on_the_toy_text_side_filters_the_concepts_token(toy_text):
    safree = S.Safree(toy_text.token_encoder(), toy_text.encode, ["red", "crimson", "scarlet"],
                      S.SafreeConfig(joiner=" "))
    assert safree.negative_prompt == "red crimson scarlet"
    row = safree.filter_prompt("a scarlet triangle is sliding to the right", 25)
    assert "scarlet" in row["triggers"] and row["steps"] == round(0.26 * 25)
    te = safree.encoder
    ids = te.ids(["a scarlet triangle is sliding to the right"])[0]
    changed = np.abs(row["context"] - row["original"]).max(-1) > 0
    assert changed[list(ids).index(te.tokenizer.convert_tokens_to_ids("▁scarlet"))]
    np.testing.assert_allclose(row["context"][changed] @ safree.concept_projection, 0.0, atol=1e-4)
    np.testing.assert_array_equal(row["context"][~changed], row["original"][~changed])
    cond, info = safree.conditioning(["a scarlet triangle is sliding to the right", "a blue square moving up"], 25)
    assert cond.context.shape == cond.late.shape == (2, *row["original"].shape) and cond.uncond.shape[0] == 1
    assert len(info) == 2 and info[0]["triggers"] == row["triggers"]
    with pytest.raises(Exception, match="needs the words"):
        S.Safree(toy_text.token_encoder(), toy_text.encode, [" "])


def _two_conditionings(toy_text):
    prompts = ["a red circle moving up", "a blue square moving left"]
    original = toy_text.encode(prompts)
    other = toy_text.encode(["a green triangle moving down", "a yellow circle moving right"])
    return original, other, toy_text.encode([""])


def test_toy_generation_with_a_window(toy_text):
    from unlearn_jax.toy import evaluate as E

    model, sched, world_cfg, encode = E.load_pipeline(TOY_WORLD)
    cfg = E.EvalConfig(num_steps=4, batch_size=2)
    original, other, uncond = _two_conditionings(toy_text)
    prompts = ["x", "y"]

    def run(steps):
        return E.generate(model, sched, world_cfg, encode, prompts, cfg,
                          conditioning=lambda _: Conditioning(other, uncond, original, np.array(steps)))

    plain = lambda ctx: E.generate(model, sched, world_cfg, encode, prompts, cfg,  # noqa: E731
                                   conditioning=lambda _: Conditioning(ctx, uncond))
    np.testing.assert_allclose(run([0, 0]), plain(original), atol=1e-5)
    np.testing.assert_allclose(run([4, 4]), plain(other), atol=1e-5)
    mixed = run([2, 0])
    assert np.abs(mixed[0] - plain(original)[0]).max() > 1e-3 and np.abs(mixed[0] - plain(other)[0]).max() > 1e-3
    np.testing.assert_allclose(mixed[1], plain(original)[1], atol=1e-5)


def test_video_generator_with_a_window(toy_text):
    from unlearn_jax.generate import VideoGenerator

    gen = VideoGenerator.from_pipeline(TOY_WORLD, dtype="float32", num_steps=3, batch_size=2, progress=False)
    original, other, uncond = _two_conditionings(toy_text)
    seeds = [1, 2]
    base = gen.generate(seeds=seeds, prompt_embeds=original, negative_prompt_embeds=uncond)
    filt = gen.generate(seeds=seeds, prompt_embeds=other, negative_prompt_embeds=uncond)
    win = lambda steps: gen.generate(seeds=seeds, conditioning=Conditioning(other, uncond, original,  # noqa: E731
                                                                              np.array(steps)))
    np.testing.assert_allclose(win([0, 0]), base, atol=1e-5)
    np.testing.assert_allclose(win([3, 9]), filt, atol=1e-5)
    mixed = win([1, 0])
    assert np.abs(mixed[0] - base[0]).max() > 1e-3
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-5)
    with pytest.raises(Exception, match="one window length per prompt"):
        gen.generate(seeds=seeds, conditioning=Conditioning(other, uncond, original, np.array([1])))


def test_esd_config_is_the_method_without_its_additions():
    """ESD-style: the default run's target and schedule, the attention weights fine-tuned, no L_loc, no L_pre,
    the bare concept prompt."""
    from unlearn_jax.config import load_config
    from repo_paths import ROOT

    ours = load_config(ROOT / "configs" / "toy_world" / "fixed_steps.py")  # the recipe the ESD row was measured beside
    esd = load_config(ROOT / "configs" / "toy_world" / "baselines" / "esd_red.py")
    assert (esd.eraser.kind, esd.erase.alpha_loc, esd.erase.beta_pre) == ("attn", 0.0, 0.0)
    assert esd.concepts[0]["prompts"] == [] and esd.concepts[0]["phrase"] == ours.concepts[0]["phrase"]
    for key in ("eta", "mask_threshold"):
        assert esd.erase[key] == ours.erase[key]
    assert esd.train.num_steps == ours.train.num_steps and esd.sampler.to_dict() == ours.sampler.to_dict()
    assert esd.workdir != ours.workdir
