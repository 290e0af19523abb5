"""Benchmark: load + convert a full-size, random-weight CogVideoX-2B diffusers folder (bf16 safetensors).

    python benchmarks/convert_cogvideox_2b.py [--workdir /tmp/unlearn_bench] [--dtype bfloat16]

Writes the random checkpoint once (streamed, no PyTorch needed), then, in a fresh process, times
`unlearn_jax.load_transformer` and reports peak host memory (ru_maxrss) against the checkpoint size,
also the orbax conversion and reload. Prints one JSON line per measurement.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "data" / "model_configs" / "cogvideox_2b_transformer.json"


def make_checkpoint(folder: Path, config_path: Path, dtype: str):
    import ml_dtypes
    import numpy as np

    from unlearn_jax.conversion import write_safetensors
    from unlearn_jax.models.cogvideox import CogVideoXConfig, abstract_model, rule_table
    from unlearn_jax.loading import _flat_targets
    from unlearn_jax.parallel import DEFAULT_RULES

    cfg = CogVideoXConfig.from_json(config_path)
    targets = _flat_targets(abstract_model(cfg), None, DEFAULT_RULES, None)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
    specs = {}
    for e in rule_table(cfg).entries():
        shape = targets[e.jax_path].shape
        specs[e.torch_key] = (e.transform.torch_shape(shape[1:] if e.layer is not None else shape), np.dtype(np_dtype))
    rng = np.random.default_rng(0)

    def tensors():
        for k, (shape, dt) in specs.items():
            yield k, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)

    folder.mkdir(parents=True, exist_ok=True)
    cfg_dict = json.loads(config_path.read_text())
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors(), specs)


CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
jax.devices()
from unlearn_jax.loading import load_transformer, save_orbax
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
t1 = time.perf_counter()
model = load_transformer(src)
jax.block_until_ready(jax.tree.leaves(__import__('flax').nnx.state(model)))
t2 = time.perf_counter()
res = {"load_s": round(t2 - t1, 2), "rss_before_load_gb": round(base / 1e9, 3)}
if mode == "orbax":
    save_orbax(model, out, overwrite=True)  # the benchmark's own output of an earlier run
    res["save_orbax_s"] = round(time.perf_counter() - t2, 2)
res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
print(json.dumps(res))
"""


def run_child(mode, src, out):
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/unlearn_bench")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--config", default=str(CONFIG))
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / f"cogvideox2b_{args.dtype}"
    if not (src / "diffusion_pytorch_model.safetensors").exists():
        t0 = time.perf_counter()
        make_checkpoint(src, Path(args.config), args.dtype)
        print(json.dumps({"wrote_random_checkpoint_s": round(time.perf_counter() - t0, 1)}))
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    res = run_child("diffusers", src, "")
    res.update(checkpoint_gb=round(size / 1e9, 3), nproc=os.cpu_count())
    res["peak_over_checkpoint"] = round(res["peak_rss_gb"] * 1e9 / size, 3)
    res["peak_minus_baseline_over_checkpoint"] = round((res["peak_rss_gb"] - res["rss_before_load_gb"]) * 1e9 / size, 3)
    print(json.dumps({"load_from_diffusers": res}))
    res = run_child("orbax", src, work / "orbax_ckpt")
    print(json.dumps({"load_then_save_orbax": res}))
    res = run_child("diffusers", work / "orbax_ckpt", "")
    print(json.dumps({"load_from_orbax": res}))


if __name__ == "__main__":
    main()
