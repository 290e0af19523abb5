"""`unlearn-jax erase` end to end on a tiny pipeline: outputs, resume, SIGTERM, non-finite loss, ablation modes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_erase import build_erase_pipeline, tiny_erase_config
from unlearn_jax.erase import NonFiniteLoss, Run, run_erase
from unlearn_jax.errors import UnlearnError
from repo_paths import ROOT



@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_erase_pipeline(tmp_path_factory.mktemp("pipe"))


def _metrics(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(pipeline, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    cfg = tiny_erase_config(pipeline, wd, **{"train.num_steps": 5})
    cfg.export.formats = ["erasers", "t2vunlearning"]
    summary = run_erase(cfg, progress=False)
    return wd, summary


def test_run_writes_metrics_checkpoints_and_plots(full_run):
    wd, summary = full_run
    assert summary["status"] == "completed" and summary["step"] == 5
    recs = _metrics(wd)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre"):
            assert np.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["loss_unlearn"] + r["loss_loc"] + r["loss_pre"], rel=1e-5)
    assert any(r["loss_loc"] > 0 for r in recs) and any(r["loss_pre"] > 0 for r in recs)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "5"]
    for name in ("loss_curves.png", "masks.png", "config.json"):
        assert (wd / name).stat().st_size > 0, name
    assert json.loads((wd / "config.json").read_text())["erase"]["eta"] == 7.0


def test_run_exports_erasers_that_load_back(pipeline, full_run):
    import jax
    import orbax.checkpoint as ocp

    import unlearn_jax

    wd, summary = full_run
    assert sorted(summary["exports"]) == sorted([str(wd / "export" / "erasers"), str(wd / "export" / "t2vunlearning")])
    assert (wd / "export" / "t2vunlearning" / "eraser_weights.pt").exists()
    model = unlearn_jax.load_transformer(pipeline, erasers=wd / "export" / "erasers")
    published = unlearn_jax.load_transformer(pipeline, erasers=wd / "export" / "t2vunlearning")
    with ocp.CheckpointManager((wd / "checkpoints").absolute()) as m:
        trained = m.restore(5)["phi"]
    np.testing.assert_array_equal(np.asarray(model.eraser_params()["up"]["kernel"]), trained["up"]["kernel"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 16, 32)).astype(np.float32)
    on, off = np.asarray(model(x, ctx, 500)), np.asarray(model(x, ctx, 500, erasers_on=False))
    assert np.abs(on - off).max() > 0  # trained erasers change the velocity
    np.testing.assert_allclose(np.asarray(published(x, ctx, 500)), on, atol=1e-6)


def test_resume_continues_the_same_trajectory(pipeline, full_run, tmp_path):
    wd_full, _ = full_run
    cfg = tiny_erase_config(pipeline, tmp_path, **{"train.num_steps": 5})
    first = Run(cfg, progress=False).train(stop_after_steps=3)  # as if killed after step 3
    assert first["status"] == "completed" and first["step"] == 3
    # A stale line past the checkpoint (a crash between logging and saving) is dropped on resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n{broken")
    second = run_erase(cfg, progress=False)
    assert second["step"] == 5
    got = [r["loss"] for r in _metrics(tmp_path)]
    want = [r["loss"] for r in _metrics(wd_full)]
    assert got == want


def test_sigterm_saves_and_exits_cleanly_then_resumes(pipeline, full_run, tmp_path):
    wd_full, _ = full_run
    cmd = [sys.executable, "-m", "unlearn_jax.cli", "erase", "--config", str(ROOT / "configs" / "tiny_test.py"),
           f"--config.model.path={pipeline}", f"--config.workdir={tmp_path}", "--config.train.num_steps=400",
           "--config.train.checkpoint_every=1000", "--config.export.formats=[]", "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM: interrupted, not finished (docs: exit codes)
    summary = json.loads(out)
    assert summary["status"] == "interrupted" and 2 <= summary["step"] < 400
    assert "rerun the same command to resume" in err
    assert (tmp_path / "checkpoints" / str(summary["step"])).exists()
    # Resuming the interrupted run (now to 5 steps) reproduces the uninterrupted run when it stopped early.
    if summary["step"] <= 5:
        cfg = tiny_erase_config(pipeline, tmp_path, **{"train.num_steps": 5})
        run_erase(cfg, progress=False)
        assert [r["loss"] for r in _metrics(tmp_path)] == [r["loss"] for r in _metrics(wd_full)]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    cfg = tiny_erase_config(pipeline, tmp_path, **{"train.num_steps": 6})
    run = Run(cfg, progress=False)
    orig = run.host_batch

    def poisoned(step):
        b = orig(step)
        if step == 3:
            b["eta"] = b["eta"] * np.float32("nan")
        return b

    monkeypatch.setattr(run, "host_batch", poisoned)
    with pytest.raises(NonFiniteLoss, match="step 3: loss is nan"):
        run.train()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]  # the last good checkpoint; nothing written after the bad step
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("overrides", [
    {"sampler.xt_source": "frozen_bank", "sampler.bank_size": 2},
    {"sampler.timestep_mode": "esd_legacy", "erase.mask_mode": "average"},
    {"eraser.kind": "lora", "erase.alpha_loc": 0.0},
    {"eraser.kind": "full"},
])
def test_ablation_modes_run(pipeline, tmp_path, overrides):
    cfg = tiny_erase_config(pipeline, tmp_path, **{"train.num_steps": 2, **overrides})
    summary = run_erase(cfg, progress=False)
    assert summary["status"] == "completed"
    recs = _metrics(tmp_path)
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs)
    if cfg.sampler.timestep_mode == "esd_legacy":
        for r in recs:
            j = r["j"]
            assert j * 1000 / 4 <= r["t"] < (j + 1) * 1000 / 4


def test_two_concepts_in_one_run(pipeline, tmp_path):
    cfg = tiny_erase_config(pipeline, tmp_path, **{"train.num_steps": 3})
    cfg.concepts = [{"phrase": "red cat", "type": "object", "eta": 3.0}, {"phrase": "green tree", "preserve": ["sky"]}]
    run = Run(cfg, progress=False)
    assert run.data.names == ["red cat", "green tree"] and list(run.data.etas) == [3.0, 7.0]
    drawn = {int(run.data.batch(s, 1, 4)["concept"][0]) for s in range(20)}
    assert drawn == {0, 1}
    assert run.train()["status"] == "completed"


def test_config_errors_are_one_line(pipeline, tmp_path):
    from unlearn_jax.config import load_config

    with pytest.raises(UnlearnError, match="no field erase.etaa"):
        load_config(ROOT / "configs" / "tiny_test.py", ["erase.etaa=3"])
    with pytest.raises(UnlearnError, match="model.path is not set"):
        Run(load_config(ROOT / "configs" / "tiny_test.py"), progress=False)
    cfg = tiny_erase_config(pipeline, tmp_path, **{"sampler.xt_source": "bank"})
    with pytest.raises(UnlearnError, match="xt_source='bank'"):
        Run(cfg, progress=False)
    cfg = load_config(ROOT / "configs" / "tiny_test.py", ["erase.eta=5", "train.num_steps=3", "eraser.kind=lora"])
    assert cfg.erase.eta == 5.0 and isinstance(cfg.erase.eta, float) and cfg.train.num_steps == 3
    assert cfg.eraser.kind == "lora"
