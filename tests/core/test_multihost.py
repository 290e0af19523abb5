"""The multi-host path TPU pods use, on one machine: two processes (jax.distributed on localhost, gloo CPU
collectives, 2 simulated devices each) run the same tiny erasure as one process with 4 devices."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_erase import build_erase_pipeline
from repo_paths import ROOT



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(pipeline, workdir, extra=()):
    return [sys.executable, "-m", "unlearn_jax.cli", "erase", "--config", str(ROOT / "configs" / "tiny_test.py"),
            f"--config.model.path={pipeline}", f"--config.workdir={workdir}", "--config.train.num_steps=3",
            "--config.train.batch_size=2", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
            "--config.export.formats=['erasers']", "--no-progress", *extra]


def _env(devices: int):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _losses(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path):
    pipe = build_erase_pipeline(tmp_path / "pipe")
    single = subprocess.run(_cmd(pipe, tmp_path / "single"), env=_env(4), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = []
    for pid in range(2):
        dist = ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen(_cmd(pipe, tmp_path / "multi", dist), env=_env(2), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-10), k
    assert (tmp_path / "multi" / "export" / "erasers" / "eraser_config.json").exists()
