"""Broken videos: the detector says when a video is not a valid toy video, and the evaluation never
counts one as correct or as erased (issue: a flooded frame read as a "green triangle")."""
from __future__ import annotations

import numpy as np
import pytest

from unlearn_jax.toy import evaluate as E
from unlearn_jax.toy.detector import check, degrade, validity
from unlearn_jax.toy.world import PALETTE, World, WorldConfig, render

BG = np.asarray(WorldConfig().background, np.float32)


def _video(attrs=None, seed=0):
    attrs = attrs or {"colour": "red", "shape": "circle", "motion": "up"}
    return render(attrs, WorldConfig(), np.random.default_rng(seed))


def test_world_videos_are_valid_even_degraded():
    videos, _, _ = World().batch(seed=11, n=200)
    rng = np.random.default_rng(0)
    assert all(validity(v) is None for v in videos)
    assert all(validity(degrade(v, rng, noise=0.08, blur=0.9)) is None for v in videos)


def _flooded():
    """The frame flooded with yellow, a dark region left: what the triangle erasure produced."""
    v = np.broadcast_to(np.asarray(PALETTE["yellow"], np.float32)[None, :, None, None], (5, 3, 20, 20)).copy()
    v[:, :, 8:14, 6:13] = BG[None, :, None, None]
    return v


def _two_objects():
    a = _video({"colour": "red", "shape": "circle", "motion": "up"}, seed=1)
    b = render({"colour": "blue", "shape": "square", "motion": "down"},
               WorldConfig(radius=2.5, radius_jitter=0.0), np.random.default_rng(2))
    out = a.copy()
    # the second object shifted into the left corner, where the first never goes
    out[:, :, 0:7, 0:7] = np.where((np.abs(b - BG[None, :, None, None]).sum(1, keepdims=True) > 0.3)[:, :, 7:14, 7:14],
                                   b[:, :, 7:14, 7:14], out[:, :, 0:7, 0:7])
    return out


@pytest.mark.parametrize("make, reason", [
    (_flooded, {"background", "flooded"}),
    (lambda: np.broadcast_to(BG[None, :, None, None], (5, 3, 20, 20)).copy(), {"no object"}),
    (lambda: np.full((5, 3, 20, 20), 0.5, np.float32), {"background"}),
    (lambda: np.random.default_rng(0).random((5, 3, 20, 20)).astype(np.float32), {"background", "flooded", "objects"}),
    (_two_objects, {"objects"}),
])
def test_broken_videos_are_flagged_with_a_reason(make, reason):
    v = make()
    got = validity(v)
    assert got in reason, got
    assert check(v)["broken"] == got


def test_an_off_palette_object_is_broken():
    v = _video()
    purple = np.asarray((0.6, 0.1, 0.9), np.float32)[None, :, None, None]
    mask = np.abs(v - BG[None, :, None, None]).sum(1, keepdims=True) > 0.3
    assert validity(np.where(mask, purple, v)) == "colour"


def _items(concept="colour:red", n=4):
    attr, value = concept.split(":")
    attrs = {"colour": "red", "shape": "circle", "motion": "up"}
    return [{"concept": concept, "attribute": attr, "value": value, "split": "train", "prompt": "p", "attributes": attrs,
             "index": i} for i in range(n)]


def _det(colour, broken=None):
    return {"colour": colour, "shape": "circle", "motion": "up", "broken": broken}


def test_a_broken_video_is_neither_correct_nor_erased():
    items = _items()
    base = E.summarize(items, [_det("red")] * 4, ["train"])
    assert base["rates"]["colour:red"]["train"] == 1.0 and base["broken"]["colour:red"]["train"] == 0.0
    # erased: two videos turn green, two are broken (and detected "green" by the attribute rules)
    erased = E.summarize(items, [_det("green"), _det("green"), _det("green", "flooded"), _det("green", "objects")],
                         ["train"])
    assert erased["rates"]["colour:red"]["train"] == 0.0
    assert erased["broken"]["colour:red"]["train"] == 0.5
    assert erased["turns_into"]["colour:red"]["train"] == {"green": 0.5, "broken": 0.5}
    assert erased["others_kept"]["colour:red"]["train"] == {"shape": 0.5, "motion": 0.5}
    cmp = E.compare(base, erased, ["colour:red"])
    cell = cmp["rates"]["colour:red"]["train"]
    assert cell["still"] == 0.5 and cmp["max_erased_rate"] == 0.5
    assert not cmp["erased_ok"] and not cmp["broken_ok"] and not cmp["target_met"]
    table = E.format_comparison(cmp)
    assert "erasure target NOT met" in table and "now detected as: green 0.50, broken 0.50" in table
    # the same videos all valid: erased, target met
    clean = E.summarize(items, [_det("green")] * 4, ["train"])
    ok = E.compare(base, clean, ["colour:red"])
    assert ok["target_met"] and "erasure target met" in E.format_comparison(ok)


def test_wilson_interval():
    lo, hi = E.wilson(0, 64)
    assert lo == 0.0 and 0.05 < hi < 0.06  # 0/64: the rate is below ~0.057 with 95% confidence
    lo, hi = E.wilson(32, 64)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert E.EvalConfig().n == 64


def test_a_run_that_misses_its_target_says_so(tmp_path, capsys):
    """Two training steps cannot erase red: the run completes, and says the target was NOT met
    (on stderr, in the summary and in eval.json), never "completed" alone."""
    import json

    from unlearn_jax.cli import main as cli_main
    from repo_paths import ROOT

    rc = cli_main(["erase", "--config", str(ROOT / "configs" / "toy_world" / "erase_red.py"), "--no-progress",
                   f"--config.workdir={tmp_path / 'run'}", "--config.train.num_steps=2",
                   "--config.train.checkpoint_every=1000", "--config.evaluate.n=2", "--config.check.every=0",
                   "--config.export.formats=['erasers']"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert '"status": "completed"' in out and '"erasure_target": "NOT met"' in out
    assert "erasure target was NOT met" in err
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert res["comparison"]["target_met"] is False and res["comparison"]["erased_ok"] is False
    assert "broken" in res["base"] and res["base"]["n"]["colour:red"]["train"] == 2
