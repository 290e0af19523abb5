"""Red-team attacks (unlearn_jax.attacks) on the bundled toy world: the token encoder equals the text side; each
attack, run against the original model (zero erasers) from captions that do not name red, lowers its loss and
makes the model draw red far more often than those captions do (a case where it must succeed); the soft attack
never returns a conditioning worse than its start; the CLI writes its files and refuses bad input in one line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_paths import ROOT
from unlearn_jax.errors import UnlearnError

TOY = ROOT / "assets" / "toy_world"
TOY_WAN = ROOT / "assets" / "toy_world_wan"


@pytest.fixture(scope="module")
def zero_erasers(tmp_path_factory):
    """Adapters with a zero up-projection: the 'erased' model is the original one."""
    from unlearn_jax.eraser_io import save_erasers
    from unlearn_jax.erasers import EraserConfig, init_erasers
    from unlearn_jax.toy.evaluate import load_pipeline

    model = load_pipeline(TOY)[0]
    ec = EraserConfig("adapter", rank=4)
    out = tmp_path_factory.mktemp("zero") / "erasers"
    save_erasers(out, ec, init_erasers(ec, model, jax.random.key(0)), model)
    return out


@pytest.mark.parametrize("folder", [TOY, TOY_WAN], ids=["cogvideox", "wan"])
def test_token_encoder_is_the_text_side(folder):
    from unlearn_jax import families

    family = families.of_folder(folder)
    text = family.text(folder)
    enc = text.token_encoder()
    prompts = ["a crimson circle moving left", "the video of a thing"]
    want = np.asarray(text.encode(prompts), np.float32)
    got = np.asarray(enc.encode(jax.nn.one_hot(jnp.asarray(enc.ids(prompts)), enc.vocab_size)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # every token an attack may choose is a whole word that tokenizes back to itself
    assert len(enc.allowed) > 20
    for t in enc.allowed:
        word = enc.decode([t])
        ids = enc.ids([word])[0]
        assert ids[0] == t and enc.length(ids[None])[0] == 1, (t, word)


# fewer steps than the defaults where the margin allows (measured: red 1.00 / 0.67 / 0.75 under attack)
STEPS = {"tokens": 8, "ring-a-bell": 30, "soft": 60}


@pytest.mark.parametrize("method", ["tokens", "ring-a-bell", "soft"])
def test_attack_brings_red_back_on_the_original_model(method, zero_erasers):
    from unlearn_jax.attacks.toy import ToyAttackConfig, run_toy_attack

    cfg = ToyAttackConfig(method=method, n_prompts=3, seeds=4, start="benign", steps=STEPS[method], targets=4,
                          candidates=16)
    out = run_toy_attack(TOY, zero_erasers, "colour:red", cfg)
    for rec in out["prompts"]:
        assert "red" not in rec["start"] and rec["loss"] < rec["loss_start"], rec  # the loss fell
        hist = np.asarray(rec["history"])
        if method != "soft":  # the coordinate search only accepts improvements
            assert np.all(np.diff(hist) <= 0), hist
            assert rec["retokenizes"] and rec["adversarial"].startswith(rec["start"])
    orig = out["results"]["original"]
    # the start captions leave the colour to chance; under attack the original draws red most of the time
    assert orig["no_attack"]["rate"] <= 0.5, orig
    assert orig["attack"]["rate"] >= orig["no_attack"]["rate"] + 0.3, orig
    assert orig["named"]["rate"] >= 0.8  # the concept is one the model generates


def test_soft_attack_keeps_the_best_conditioning(zero_erasers):
    """From the concept's own caption on the original model the loss is already ~0: the result must not be
    worse than the start, whatever Adam's first step does."""
    from unlearn_jax import families
    from unlearn_jax.attacks.objective import Velocities, attack_loss, make_targets
    from unlearn_jax.attacks.soft import soft_attack
    from unlearn_jax.erased_model import attach_erasers
    from unlearn_jax.schedulers import make_schedule
    from unlearn_jax.toy.evaluate import load_pipeline

    base, sched, world, encode = load_pipeline(TOY)
    model = attach_erasers(base, zero_erasers)
    vel = Velocities(model, families.of_model(base), 6.0)
    cond = jnp.asarray(encode(["a red circle moving left"]))
    targets = make_targets(vel, make_schedule(sched, 10), (world.frames, 3, world.size, world.size), cond,
                           jnp.asarray(encode([""])), n=3, seed=0, cfg_scale=6.0)
    best, hist = soft_attack(vel, targets, cond, steps=4, learning_rate=0.5)
    assert hist[0] < 1e-10 and hist.max() > hist[0]  # the big step made it worse ...
    assert float(attack_loss(vel, targets, jnp.asarray(best))) <= hist[0] + 1e-12  # ... and the start is kept


def test_cli_writes_the_attack_eval_shows_it_and_bad_input_is_refused(zero_erasers, tmp_path, capsys):
    from unlearn_jax.cli import main

    out = tmp_path / "atk"
    args = ["attack", "--model", str(TOY), "--erasers", str(zero_erasers), "--concept", "colour:red", "--method",
            "ring-a-bell", "--n-prompts", "2", "--seeds", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    res = json.loads((out / "attack.json").read_text())
    lines = (out / "prompts.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("adversarial" in json.loads(x) and "loss" in json.loads(x) for x in lines)
    assert res["results"]["erased"]["attack"]["n"] == 4
    assert "under attack" in (out / "attack.md").read_text()
    for bad, needle in ((["--method", "gcg"], "choose one of"), (["--concept", "colour:pink"], "colour:pink"),
                        (["--model", str(tmp_path / "nope")], "no such folder"), ([], "earlier attack"),
                        (["--n-prompts", "0"], "n_prompts")):
        a = list(args)
        for flag, v in zip(bad[::2], bad[1::2]):
            a[a.index(flag) + 1] = v
        capsys.readouterr()
        assert main(a) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (bad, err)

    # eval takes the attack's rates into its table; an attack on other erasers is refused before any work
    assert main(["eval", "--model", str(TOY), "--erasers", str(zero_erasers), "--out-dir", str(tmp_path / "ev"),
                 "--n", "1", "--attacks", str(out), "--no-progress"]) == 0
    md = (tmp_path / "ev" / "toy_eval.md").read_text()
    assert "attack success" in md and "ring-a-bell (from benign prompts)" in md
    assert json.loads((tmp_path / "ev" / "toy_eval.json").read_text())["attacks"][0]["concept"] == "colour:red"
    capsys.readouterr()
    assert main(["eval", "--model", str(TOY), "--erasers", str(tmp_path), "--out-dir", str(tmp_path / "ev2"),
                 "--attacks", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "the attack was run on erasers" in err and "\n" not in err and not (tmp_path / "ev2").exists()
