"""`unlearn-jax attack` on a real pipeline folder (a tiny CogVideoX with a VAE and a T5): the attacked prompts come
from a prompt set, each search lowers (never raises) its loss on the erased model, every cell is generated for the
original and the erased model and measured by NudeNet through the evaluation protocol, the files are written
(adversarial.csv readable by `unlearn-jax eval --prompts`; soft conditionings that regenerate the measured videos),
`eval --attacks` joins the rates, and bad input is refused in one line."""
import csv
import json

import numpy as np
import pytest

from unlearn_jax.cli import main as cli_main

pytest.importorskip("nudenet")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers_cogvideox import build_video_pipeline
    from helpers_erase import random_erasers

    root = tmp_path_factory.mktemp("attack_ckpt")
    pipe = build_video_pipeline(root / "pipe", rope=False)[0]
    erasers = random_erasers(pipe, root / "erasers")
    prompts = root / "set.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "normal prompt", "seed"])
        # the tiny tokenizer spends several tokens on a word and has 16 positions: short prompts
        w.writerows([["red dog", "dog", 3], ["red boat", "boat", 5], ["red bird", "bird", 8]])
    return pipe, erasers, prompts


def _args(tiny, out, method, *extra):
    pipe, erasers, prompts = tiny
    return ["attack", "--model", str(pipe), "--erasers", str(erasers), "--concept", "nudity", "--prompts",
            str(prompts), "--method", method, "--out", str(out), "--n-prompts", "2", "--sampling-steps", "2",
            "--dtype", "float32", "--no-progress", *extra]


@pytest.mark.parametrize("method, extra", [("tokens", ["--steps", "2"]), ("ring-a-bell", ["--steps", "2"]),
                                           ("soft", ["--steps", "3", "--seeds", "2", "--save-videos"])])
def test_attack_on_a_pipeline_folder(tiny, tmp_path, capsys, method, extra):
    out = tmp_path / method
    assert cli_main(_args(tiny, out, method, *extra)) == 0
    printed = capsys.readouterr().out
    assert f"attack `{method}` on nudity" in printed and "NudeNet" in printed
    res = json.loads((out / "attack.json").read_text())
    seeds = 2 if method == "soft" else 1
    assert res["concept"] == "nudity" and res["generation"]["num_steps"] == 2
    assert len(res["prompts"]) == 2
    for rec in res["prompts"]:
        h = rec["history"]
        assert rec["loss"] <= rec["loss_start"] + 1e-7 and np.isfinite(h).all()
        if method != "soft":  # the coordinate search only ever keeps a lower loss
            assert all(b <= a + 1e-7 for a, b in zip(h, h[1:]))
            assert rec["adversarial"].startswith(rec["start"]) and len(rec["tokens"]) == 3
    # ring-a-bell starts from the set's benign counterparts, so the named prompts are a cell too
    cells = {"no_attack", "attack"} | ({"named"} if method == "ring-a-bell" else set())
    for model in ("original", "erased"):
        assert set(res["results"][model]) == cells
        for c in res["results"][model].values():
            assert c["n"] == 2 * seeds and 0 <= c["rate"] <= 1 and c["interval"][0] <= c["rate"] <= c["interval"][1]
    summary = json.loads((out / "measure" / "summary.json").read_text())
    assert set(summary["results"]) == cells
    assert (out / "measure" / "contact_sheet.png").is_file()
    with open(out / "measure" / "per_frame.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["prompt_set"] for r in rows} == cells and {r["model"] for r in rows} == {"original", "erased"}
    lines = (out / "prompts.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("loss" in json.loads(x) for x in lines)
    if method == "soft":
        assert not (out / "adversarial.csv").exists()
        assert sorted(p.name for p in (out / "soft").iterdir()) == ["0000.npz", "0001.npz"]
        _soft_conditioning_regenerates_its_measured_video(tiny, out, tmp_path)
    else:
        from unlearn_jax.prompt_sets import load_prompt_set

        items = load_prompt_set(out / "adversarial.csv")
        assert [it["prompt"] for it in items] == [r["adversarial"] for r in res["prompts"]]
        assert [it["seed"] for it in items] == [3, 5]
    if method == "tokens":
        _eval_joins_the_attack(tiny, out, tmp_path, capsys)


def _soft_conditioning_regenerates_its_measured_video(tiny, out, tmp_path):
    """The saved soft conditioning, given back to the generator, makes the video the attack measured."""
    from unlearn_jax.generate import VideoGenerator
    from unlearn_jax.video_io import read_mp4, to_uint8, write_mp4

    pipe, erasers, _ = tiny
    gen = VideoGenerator.from_pipeline(pipe, erasers=erasers, dtype="float32", num_steps=2, progress=False)
    cond = dict(np.load(out / "soft" / "0000.npz"))["prompt_embeds"]
    video = to_uint8(gen.generate(None, [3], prompt_embeds=cond))[0]
    saved = read_mp4(out / "videos" / "erased" / "attack" / "0000_0.mp4")
    # the same frames encoded the same way (MP4 is lossy: compare encodings)
    write_mp4(tmp_path / "again.mp4", video)
    np.testing.assert_array_equal(read_mp4(tmp_path / "again.mp4"), saved)
    # and it is not the start prompt's video
    start = to_uint8(gen.generate(["red dog"], [3]))[0]
    assert np.abs(start.astype(int) - video.astype(int)).mean() > 0


def _eval_joins_the_attack(tiny, out, tmp_path, capsys):
    """`unlearn-jax eval` measures the attack's adversarial.csv and adds the attack's rates to its table."""
    pipe, erasers, _ = tiny
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(pipe), "--erasers", str(erasers), "--out-dir", str(ev), "--prompts",
                     str(out / "adversarial.csv"), "--steps", "2", "--dtype", "float32", "--no-progress",
                     "--attacks", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attack success" in printed and "tokens (from concept prompts)" in printed
    assert (ev / "attacks.md").is_file()


@pytest.mark.parametrize("change, match", [
    (["--prompts", None], "name the attacked prompts with --prompts"),
    (["--method", "genetic"], "choose one of soft, tokens, ring-a-bell"),
    (["--benign-column", "clean"], "benign counterpart, column 'clean'"),
    (["--metrics", "face"], "NudeNet"),
    (["--n-tokens", "0"], "n_tokens = 0 is invalid"),
    (["--sampler", "euler"], "sampler = 'euler' is invalid"),
])
def test_attack_errors_are_one_line(tiny, tmp_path, capsys, change, match):
    args = _args(tiny, tmp_path / "o", "ring-a-bell", "--steps", "1")
    flag, value = change
    if value is None:
        i = args.index(flag)
        del args[i:i + 2]
    else:
        args += [flag, value]
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1, err


def test_attack_out_folder_rules(tiny, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    rc = cli_main(_args(tiny, theirs, "tokens", "--steps", "1"))
    assert rc == 2 and "did not write" in capsys.readouterr().err
    assert (theirs / "notes.txt").read_text() == "mine"


def test_attack_settings_claim_the_folder(tmp_path):
    """Same settings: the measurement stays (a rerun resumes it); other settings: refused, or with --overwrite the
    earlier measurement is removed (never a file of the user's)."""
    from unlearn_jax.attack_cli import _claim
    from unlearn_jax.errors import UnlearnError

    out = tmp_path / "a"
    _claim(out, {"config": {"steps": 1}}, overwrite=False)
    (out / "measure").mkdir()
    (out / "measure" / "summary.json").write_text("{}")
    _claim(out, {"config": {"steps": 1}}, overwrite=False)
    assert (out / "measure" / "summary.json").is_file()
    with pytest.raises(UnlearnError, match="other settings"):
        _claim(out, {"config": {"steps": 2}}, overwrite=False)
    (out / "notes.txt").write_text("mine")
    _claim(out, {"config": {"steps": 2}}, overwrite=True)
    assert not (out / "measure").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "attack_settings.json").read_text()) == {"config": {"steps": 2}}
