"""benchmarks/gpu_suite.py runs unchanged at a tiny size on the CPU, so that its first run on a GPU
is its real one: every part compiles and runs, and its figures are consistent with each other."""
import importlib.util
import json
import math

from repo_paths import ROOT


def test_gpu_suite_runs_at_a_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    r = suite.run(["--size", "tiny", "--repeats", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "trained pass" in printed and "MFU" in printed and "500 steps" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["latent_shape"] == [3, 16, 4, 6] and r["video_tokens"] == 3 * 2 * 3 and r["text_tokens"] == 13
    for part in ("sampler_step", "frozen_passes", "step_bank", "step_current"):
        assert r["seconds"][part] > 0 and r["flops"][part] > 0 and r["compile_s"][part] > 0
    # the current step samples x_t and x_pre (25 steps each) on top of the bank step's work
    assert r["flops"]["step_current"] > r["flops"]["step_bank"] > r["flops"]["frozen_passes"] > 0
    assert r["trained_pass_flops"] == r["flops"]["step_bank"] - r["flops"]["frozen_passes"]
    assert r["peak_source"].startswith("measured") and r["peak_flops"] > 0
    for k in ("mfu_sampler_step", "mfu_trained_pass", "mfu_step_current"):
        assert 0 < r[k] < 1 and math.isfinite(r[k])
    assert math.isclose(r["projected_500_steps_min_current"], 500 * r["iteration_s_current"] / 60)
    assert r["peak_device_memory_gb"] is None  # the CPU keeps no allocator statistics
