"""`unlearn-jax eval` end to end: on the toy world and on a tiny pipeline with a VAE (nudity metric)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from unlearn_jax.cli import main as cli_main
from helpers_erase import random_erasers as _random_erasers
from repo_paths import ROOT

TOY = ROOT / "assets" / "toy_world"


def test_toy_world_eval_writes_table_json_and_sheet(tmp_path, capsys):
    erasers = _random_erasers(TOY, tmp_path / "erasers")
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--model", str(TOY), "--erasers", str(erasers), "--out-dir", str(out), "--n", "1",
                   "--steps", "4", "--erased-concepts", "colour:red", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "colour:red" in printed and "(erased)" in printed and "largest drop" in printed
    res = json.loads((out / "toy_eval.json").read_text())
    assert set(res) >= {"original", "erased", "comparison"}
    cmp = res["comparison"]
    assert len(cmp["rates"]) == 11 and cmp["erased_concepts"] == ["colour:red"]
    assert len(res["original"]["items"]) == len(res["erased"]["items"]) == 11 * 2
    # same prompts for both models; other concepts' prompts avoid red
    assert [i["prompt"] for i in res["original"]["items"]] == [i["prompt"] for i in res["erased"]["items"]]
    assert all(i["attributes"]["colour"] != "red" for i in res["original"]["items"] if i["concept"] != "colour:red")
    for name, row in cmp["rates"].items():
        for cell in row.values():
            assert cell["change"] == pytest.approx(cell["erased"] - cell["base"])
    assert (out / "toy_eval.md").read_text().startswith("```")
    assert (out / "toy_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, match", [
    (["--erased-concepts", "colour:purple"], "unknown toy concepts"),
    (["--erased-concepts", "colour:red"], "needs --erasers"),
    (["--n", "0"], "--n must be >= 1"),
])
def test_toy_world_eval_errors(tmp_path, capsys, args, match):
    rc = cli_main(["eval", "--model", str(TOY), "--out-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1


def test_eval_needs_prompts_for_a_real_pipeline(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    rc = cli_main(["eval", "--model", str(tmp_path / "pipe"), "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and "--prompts" in capsys.readouterr().err


def _two_prompt_set(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "seed"])
        w.writerows([["a red dog in the garden", 3], ["a small boat at night", 5]])
    return path


def test_prompt_set_eval_on_a_tiny_pipeline(tmp_path, capsys):
    pytest.importorskip("nudenet")
    from helpers_cogvideox import FRAMES
    from helpers_cogvideox import build_video_pipeline as _build

    pipe = _build(tmp_path / "pipe", rope=False)[0]
    erasers = _random_erasers(pipe, tmp_path / "erasers")
    prompts = _two_prompt_set(tmp_path / "set.csv")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(pipe), "--erasers", str(erasers), "--out-dir", str(out), "--prompts", str(prompts),
            "--metrics", "nudity,face", "--steps", "2", "--dtype", "float32", "--save-videos", "--no-progress"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "face metric skipped" in printed  # no ArcFace model given: skipped with a message
    for name in ("per_frame.csv", "summary.json", "comparison.md", "contact_sheet.png", "eval_settings.json"):
        assert (out / name).is_file(), name
    with open(out / "per_frame.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * FRAMES  # models x videos x frames
    assert {r["model"] for r in rows} == {"original", "erased"}
    summary = json.loads((out / "summary.json").read_text())
    text = json.dumps(summary)
    assert "nudity" in text and "original" in text and "erased" in text
    for model in ("original", "erased"):
        assert len(list((out / "videos" / model / "set").glob("*.mp4"))) == 2
    # the two models made different videos from the same seeds (the erasers act)
    from unlearn_jax.video_io import read_mp4

    a = read_mp4(sorted((out / "videos" / "original" / "set").glob("*.mp4"))[0])
    b = read_mp4(sorted((out / "videos" / "erased" / "set").glob("*.mp4"))[0])
    assert a.shape == b.shape and not np.array_equal(a, b)
    # a rerun resumes from the stored records; other settings are refused without --overwrite
    assert cli_main(args) == 0
    assert "already measured" in capsys.readouterr().out
    rc = cli_main([*args[:-6], "--steps", "3", "--dtype", "float32", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "other settings" in err and err.count("\n") == 1


@pytest.mark.parametrize("method", ["negative-prompt", "safree"])
def test_toy_world_eval_of_an_inference_time_baseline(tmp_path, capsys, method):
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--model", str(TOY), "--method", method, "--out-dir", str(out), "--n", "1", "--steps", "4",
                   "--erased-concepts", "colour:red", "--no-progress"])
    assert rc == 0
    assert "(erased)" in capsys.readouterr().out
    res = json.loads((out / "toy_eval.json").read_text())
    assert res["method"] == method and res["erasers"] is None
    assert res["concept_words"] == ["red", "crimson", "scarlet"]   # the erased concept's train synonyms
    assert [i["prompt"] for i in res["original"]["items"]] == [i["prompt"] for i in res["erased"]["items"]]
    if method == "safree":
        assert res["safree"]["max_window"] == 0.26 and res["safree"]["negative_prompt"] is True
    if method == "negative-prompt":
        assert res["erased"]["settings"]["negative_prompt"] == "red crimson scarlet"
        assert res["original"]["settings"]["negative_prompt"] == ""


@pytest.mark.parametrize("args, match", [
    (["--method", "safree", "--erasers", "."], "drop --erasers"),
    (["--method", "erasers"], "needs --erasers DIR"),
    (["--concept-words", "red"], "are for --method negative-prompt / safree"),
    (["--method", "safree", "--safree-window", "1.5", "--erased-concepts", "colour:red"], "a fraction in [0, 1]"),
    (["--method", "negative-prompt", "--safree-window", "0.5", "--erased-concepts", "colour:red"], "for --method safree"),
    (["--method", "safree"], "name the concept with --erased-concepts"),
    (["--method", "negative-prompt", "--negative-prompt", "blurry"], "drop --negative-prompt"),
    (["--method", "negative-prompt", "--safree-filter-only", "--erased-concepts", "colour:red"],
     "an option of --method safree"),
])
def test_baseline_option_errors(tmp_path, capsys, args, match):
    rc = cli_main(["eval", "--model", str(TOY), "--out-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1


def test_prompt_set_eval_of_safree_on_a_tiny_pipeline(tmp_path, capsys):
    pytest.importorskip("nudenet")
    from helpers_cogvideox import build_video_pipeline as _build

    pipe = _build(tmp_path / "pipe", rope=False)[0]
    prompts = _two_prompt_set(tmp_path / "set.csv")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(pipe), "--method", "safree", "--concept-words", "red", "dog", "--out-dir", str(out),
            "--prompts", str(prompts), "--metrics", "nudity", "--steps", "2", "--dtype", "float32", "--no-progress"]
    assert cli_main(args) == 0
    with open(out / "per_frame.csv", newline="") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"original", "safree"}
    settings = json.loads((out / "eval_settings.json").read_text())
    assert settings["method"] == "safree" and settings["concept_words"] == ["red", "dog"]
    capsys.readouterr()
    rc = cli_main(["eval", "--model", str(pipe), "--method", "safree", "--out-dir", str(tmp_path / "o2"),
                   "--prompts", str(prompts), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--concept-words" in err and err.count("\n") == 1
