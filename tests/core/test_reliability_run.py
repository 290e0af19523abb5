"""Reliability of the commands as a careful user and a faulty machine meet them (issue 12): nothing a
user owns is deleted, every run can finish, every bad value is refused in one line before any work,
exit codes tell outcomes apart. One test per class of case; each is short."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_erase import build_erase_pipeline, tiny_erase_config
from repo_paths import ROOT
from unlearn_jax.cli import main
from unlearn_jax.errors import UnlearnError


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_erase_pipeline(tmp_path_factory.mktemp("pipe"))


def _erase(capsys, pipeline, workdir, *overrides):
    capsys.readouterr()
    rc = main(["erase", "--config", str(ROOT / "configs" / "tiny_test.py"), f"--config.model.path={pipeline}",
               f"--config.workdir={workdir}", "--no-progress", *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _losses(workdir):
    return [json.loads(ln)["loss"] for ln in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ---- silently wrong / tracebacks: every bad value refused before any work --------------------------
@pytest.mark.parametrize("override,needle", [
    ("--config.train.num_steps=0", "train.num_steps"),
    ("--config.train.num_steps=-3", "train.num_steps"),
    ("--config.train.learning_rate=-1", "train.learning_rate"),
    ("--config.erase.eta=-3", "erase.eta"),
    ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every"),
])
def test_bad_values_are_refused_before_any_work(capsys, pipeline, tmp_path, override, needle):
    rc, _, err = _erase(capsys, pipeline, tmp_path / "wd", override)
    assert rc == 2
    _one_line(err, needle)
    assert not (tmp_path / "wd").exists()  # refused before the workdir was even made


def test_workdir_that_is_a_file_and_a_broken_config_are_one_line(capsys, pipeline, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    rc, _, err = _erase(capsys, pipeline, afile)
    assert rc == 2 and afile.read_text() == "mine"
    _one_line(err, "is a file")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise ValueError('oops')\n")
    capsys.readouterr()
    assert main(["erase", "--config", str(broken)]) == 2
    _one_line(capsys.readouterr().err, "broken.py", "oops")


# ---- a run that can always finish ------------------------------------------------------------------
def test_a_finished_run_reruns_to_exit_0_and_finishes_a_missing_export(capsys, pipeline, tmp_path):
    wd = tmp_path / "wd"
    rc, out, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=3", "--config.export.formats=['erasers']")
    assert rc == 0, err
    losses = _losses(wd)
    # killed after the final checkpoint, before the export: the rerun only exports
    import shutil

    shutil.rmtree(wd / "export")
    rc, out, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=3", "--config.export.formats=['erasers']")
    assert rc == 0, err
    assert json.loads(out)["status"] == "completed" and (wd / "export" / "erasers" / "erasers.safetensors").exists()
    assert _losses(wd) == losses  # no step was run again
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=3", "--config.export.formats=['erasers']")
    assert rc == 0, err  # and again: the export of this run is replaced, nothing else


def test_a_changed_trajectory_field_is_refused_on_resume(capsys, pipeline, tmp_path):
    wd = tmp_path / "wd"
    assert _erase(capsys, pipeline, wd, "--config.train.num_steps=2")[0] == 0
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=4", "--config.train.batch_size=2")
    assert rc == 2
    _one_line(err, "train.batch_size")
    (wd / "config.json").write_text((wd / "config.json").read_text()[:40])  # truncated
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=4")
    assert rc == 2
    _one_line(err, "config.json")


def test_a_corrupt_latest_checkpoint_is_skipped_for_the_previous_good_one(capsys, pipeline, tmp_path):
    ref = tmp_path / "ref"
    assert _erase(capsys, pipeline, ref, "--config.train.num_steps=6")[0] == 0
    wd = tmp_path / "wd"
    assert _erase(capsys, pipeline, wd, "--config.train.num_steps=4")[0] == 0  # checkpoints 2 and 4
    step4 = wd / "checkpoints" / "4"
    victim = max((p for p in step4.rglob("*") if p.is_file() and p.name != "unlearn_jax_checksums.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    victim.write_bytes(bytes(data))
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=6")
    assert rc == 0, err
    assert "skipped step 4" in err and "resuming from step 2" in err
    assert (wd / "checkpoints" / "4.corrupt").is_dir()  # set aside, not deleted
    assert _losses(wd) == _losses(ref)  # the resumed trajectory is the uninterrupted one, bit for bit


# ---- two runs at once ------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_first(capsys, pipeline, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom unlearn_jax.workdir_lock import WorkdirLock\n"
                               f"WorkdirLock({str(wd)!r}, 'test holder').acquire()\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=2")
        assert rc == 75
        _one_line(err, str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=2")  # the dead holder's lock is taken over
    assert rc == 0 and "takes the workdir over" in err
    assert not (wd / ".lock").exists()  # released at the end


# ---- data loss: nothing is written through a link out of the workdir -------------------------------
def test_a_linked_export_folder_is_never_written_through(capsys, pipeline, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(outside, wd / "export")
    rc, _, err = _erase(capsys, pipeline, wd, "--config.train.num_steps=2", "--config.export.formats=['erasers']")
    assert rc == 2
    _one_line(err, "outside")
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


# ---- sample: outputs and memory --------------------------------------------------------------------
def test_sample_refuses_to_replace_files_and_too_large_generations(capsys, tmp_path, monkeypatch):
    toy = ROOT / "assets" / "toy_world"
    out = tmp_path / "x.mp4"
    out.write_bytes(b"mine")
    capsys.readouterr()
    assert main(["sample", "--model", str(toy), "--prompt", "a red ball", "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "--overwrite")
    assert out.read_bytes() == b"mine"
    user = tmp_path / "user"
    user.mkdir()
    (user / "0000.mp4").write_bytes(b"mine")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na red ball\n")
    assert main(["sample", "--model", str(toy), "--prompts", str(prompts), "--out-dir", str(user),
                 "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "did not write")
    assert (user / "0000.mp4").read_bytes() == b"mine"
    # a generation that cannot fit is refused from XLA's own estimate, before it runs
    import unlearn_jax.memory as M

    monkeypatch.setattr(M, "available_bytes", lambda device=None: 1024)
    assert main(["sample", "--model", str(toy), "--prompt", "a red ball", "--out", str(tmp_path / "y.mp4"),
                 "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "GiB of working memory", "fewer frames")
    assert not (tmp_path / "y.mp4").exists()


def test_a_full_disk_is_one_line_with_its_exit_code(capsys, monkeypatch):
    import errno

    import unlearn_jax.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    import types

    monkeypatch.setattr(parser, "parse_args", lambda argv: types.SimpleNamespace(func=full, command="x"))
    assert cli.main(["erase", "--config", "x.py"]) == 74
    _one_line(capsys.readouterr().err, "/data/run/metrics.jsonl", "No space left", "free space")


def test_published_files_that_disagree_are_refused(tmp_path):
    from helpers_cogvideox import build_torch, tiny_config

    import unlearn_jax
    from unlearn_jax import export
    from unlearn_jax.eraser_io import load_erasers
    from unlearn_jax.erasers import EraserConfig, init_erasers

    import jax
    import torch

    build_torch(tiny_config("2b_sincos")).save_pretrained(tmp_path / "m")
    model = unlearn_jax.load_transformer(tmp_path / "m")
    cfg = EraserConfig("adapter", rank=4)
    phi = init_erasers(cfg, model, jax.random.key(0))
    pub = export.export_t2vunlearning(tmp_path / "pub", cfg, phi, model, readme=True)
    assert "--eraser_rank 4" in (pub / "README.md").read_text()  # the authors' scripts assume 128
    sd = torch.load(pub / "eraser_weights.pt", weights_only=True)
    sd["transformer_blocks.0.attn1.adapter"]["down.bias"] += 1.0  # a replaced .pt beside the old safetensors
    torch.save(sd, pub / "eraser_weights.pt")
    with pytest.raises(UnlearnError, match="hold different erasers") as e:
        load_erasers(pub, model)
    assert "\n" not in str(e.value)
    (pub / "eraser_weights.safetensors").unlink()
    _, phi_pt = load_erasers(pub, model)
    np.testing.assert_allclose(np.asarray(phi_pt["down"]["bias"][0]), np.asarray(phi["down"]["bias"][0]) + 1.0,
                               rtol=0, atol=1e-6)


def test_prompts_augment_refuses_a_pickled_llm_in_one_line(capsys, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers_text import train_t5_tokenizer

    llm = tmp_path / "llm"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(llm)
    (llm / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({**model.state_dict(), "evil": Evil()}, llm / "pytorch_model.bin")
    train_t5_tokenizer().save_pretrained(llm)
    capsys.readouterr()
    rc = main(["prompts", "augment", "--concept", "a cat", "--type", "object", "--llm", str(llm), "--n", "1",
               "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2
    _one_line(capsys.readouterr().err, "unpickle", "safetensors")
    assert not marker.exists() and not (tmp_path / "p.jsonl").exists()


def test_eval_never_writes_into_a_users_folder(capsys, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "summary.json").write_text("mine")
    capsys.readouterr()
    assert main(["eval", "--model", str(ROOT / "assets" / "toy_world"), "--out-dir", str(user), "--n", "1"]) == 2
    _one_line(capsys.readouterr().err, "did not write")
    assert (user / "summary.json").read_text() == "mine" and len(list(user.iterdir())) == 1


def test_sigterm_during_periodic_checkpoints_exits_143(pipeline, tmp_path):
    """Checkpoints every step, so the signal lands during or right after a periodic save (the final save
    then meets the step just saved: a no-op, not StepAlreadyExistsError)."""
    import signal

    cmd = [sys.executable, "-m", "unlearn_jax.cli", "erase", "--config", str(ROOT / "configs" / "tiny_test.py"),
           f"--config.model.path={pipeline}", f"--config.workdir={tmp_path}", "--config.train.num_steps=400",
           "--config.train.checkpoint_every=1", "--config.export.formats=[]", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and json.loads(out)["status"] == "interrupted"
