"""Outputs never replace what a user owns (unlearn_jax.atomic) and the weight converters refuse, in one
line with exit code 2, an OUT that is not theirs, integer tensors and other user mistakes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unlearn_jax import atomic
from unlearn_jax.atomic import MARKER, atomic_dir, check_output_dir, is_ours, safe_child, write_dir
from unlearn_jax.errors import UnlearnError
from repo_paths import ROOT

TOOLS = ROOT / "tools" / "convert_weights"


def _write(folder, files=("a.txt",)):
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(f)


def _ours(path, files=("a.txt", "sub/b.txt")):
    with atomic_dir(path, overwrite=False) as tmp:
        _write(tmp, files)
    return path


# --------------------------------------------------------------------------------------------
# atomic_dir / check_output_dir / write_dir
# --------------------------------------------------------------------------------------------
def test_new_output_writes_marker_listing_entries(tmp_path):
    out = _ours(tmp_path / "out")
    meta = json.loads((out / MARKER).read_text())
    assert meta["entries"] == ["a.txt", "sub/b.txt"]
    assert is_ours(out)
    assert check_output_dir(tmp_path / "absent", False) == "absent"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", False) == "empty"
    _ours(tmp_path / "empty")  # an empty folder holds nothing to lose
    assert is_ours(tmp_path / "empty")


def test_existing_output_needs_overwrite_and_is_replaced(tmp_path):
    out = _ours(tmp_path / "out")
    with pytest.raises(UnlearnError, match="pass overwrite=True"):
        with atomic_dir(out, overwrite=False) as tmp:
            raise AssertionError("the body must not run")
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, ["new.txt"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("overwrite", [False, True])
def test_user_folder_and_file_are_refused_untouched(tmp_path, overwrite):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(UnlearnError) as e:
        with atomic_dir(user, overwrite=overwrite):
            pass
    msg = str(e.value)
    assert "\n" not in msg and str(user) in msg and "overwrite=True" in msg and "did not write" in msg
    assert (user / "thesis.tex").read_text() == "mine"
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(UnlearnError, match="is a file"):
        check_output_dir(f, overwrite)
    assert f.read_text() == "keep"


def test_our_folder_with_a_user_file_inside_is_refused(tmp_path):
    out = _ours(tmp_path / "out")
    (out / "sub" / "notes.md").write_text("mine")
    with pytest.raises(UnlearnError, match=r"did not write \(sub/notes.md\)"):
        check_output_dir(out, True)
    (out / "sub" / "notes.md").unlink()
    (out / MARKER).write_text("{broken")
    with pytest.raises(UnlearnError, match="marker cannot be read"):
        check_output_dir(out, True)


def test_recheck_before_swap_and_failure_keeps_old(tmp_path):
    out = _ours(tmp_path / "out")
    with pytest.raises(UnlearnError, match="did not write"):
        with atomic_dir(out, overwrite=True) as tmp:
            _write(tmp, ["x"])
            (out / "added_meanwhile").write_text("mine")  # while the body ran
    assert (out / "added_meanwhile").exists() and (out / "a.txt").exists()
    (out / "added_meanwhile").unlink()
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True):
            raise RuntimeError("boom")
    assert (out / "a.txt").exists() and is_ours(out)


def test_links_are_never_written_through_or_replaced(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(outside, wd / "export")
    with pytest.raises(UnlearnError, match="outside"):
        safe_child(wd, "export/erasers")
    with pytest.raises(UnlearnError, match="outside"):
        safe_child(wd, "../outside")
    with pytest.raises(UnlearnError, match="outside"):
        with atomic_dir(wd / "export" / "erasers", overwrite=True, root=wd):
            pass
    with pytest.raises(UnlearnError, match="outside"):  # a new output too
        with atomic_dir(wd / "export" / "erasers", root=wd):
            pass
    # A link to one of our own outputs is not replaced (that would delete through it) either.
    ours = _ours(wd / "ours")
    os.symlink(ours, wd / "link")  # inside the root, so only the link rule refuses it
    with pytest.raises(UnlearnError, match="symbolic link"):
        check_output_dir(wd / "link", True, root=wd)
    assert sorted(p.name for p in outside.iterdir()) == ["precious"] and (ours / "a.txt").exists()
    (wd / "checkpoints").mkdir()
    assert safe_child(wd, "checkpoints") == wd / "checkpoints"


def test_the_default_never_replaces_anything(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "x").write_text("old")
    with pytest.raises(UnlearnError, match="did not write it"):
        with atomic_dir(user) as tmp:
            _write(tmp, ["y"])
    assert sorted(p.name for p in user.iterdir()) == ["x"]  # a writer that says nothing replaces nothing


def test_write_dir_adopts_a_folder_writer(tmp_path):
    def writer(folder):  # like save_transformer: writes its own folder at the path given
        with atomic_dir(folder) as tmp:
            _write(tmp, ["config.json", "w/x.bin"])

    out = write_dir(tmp_path / "o", writer, overwrite=False)
    assert json.loads((out / MARKER).read_text())["entries"] == ["config.json", "w/x.bin"]
    write_dir(out, writer, overwrite=True)
    with pytest.raises(UnlearnError):
        write_dir(out, writer, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_legacy_layouts_match_their_sources(tmp_path):
    from unlearn_jax import eraser_io
    from unlearn_jax.families import ORBAX_MARKER

    (orbax_name, _, orbax_allowed), (er_name, (key, fmt), er_allowed) = atomic._LEGACY_LAYOUTS
    assert orbax_name == ORBAX_MARKER and "params" in orbax_allowed
    assert er_name == eraser_io.CONFIG_NAME and fmt == eraser_io.FORMAT and key == "format"
    assert er_allowed == {eraser_io.CONFIG_NAME, eraser_io.WEIGHTS_NAME}
    old = tmp_path / "old_ckpt"  # an orbax checkpoint written before markers existed
    (old / "params").mkdir(parents=True)
    (old / ORBAX_MARKER).write_text("{}")
    assert check_output_dir(old, True) == "ours"
    (old / "README.txt").write_text("user")
    with pytest.raises(UnlearnError, match="README.txt"):
        check_output_dir(old, True)
    pub = tmp_path / "pub"  # a published eraser folder: could be a user's download, never ours without a marker
    pub.mkdir()
    (pub / "eraser_config.json").write_text('{"eraser_type": "adapter", "eraser_rank": 128}')
    with pytest.raises(UnlearnError, match="did not write"):
        check_output_dir(pub, True)


# --------------------------------------------------------------------------------------------
# The converters, run as subprocesses on a tiny CogVideoX
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from helpers_cogvideox import tiny_config
    from unlearn_jax import eraser_io
    from unlearn_jax.erasers import EraserConfig
    from unlearn_jax.loading import save_transformer
    from unlearn_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer

    root = tmp_path_factory.mktemp("tiny")
    model = CogVideoXTransformer(CogVideoXConfig.from_dict(tiny_config("2b_sincos")), rngs=nnx.Rngs(0))
    save_transformer(model, root / "model")
    save_transformer(model, root / "int_model")
    st = root / "int_model" / "diffusion_pytorch_model.safetensors"
    t = load_file(st)
    t["norm_out.linear.weight"] = (100 * t["norm_out.linear.weight"]).astype(np.int32)
    save_file(t, st)
    cfg = EraserConfig(kind="adapter", rank=3)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in eraser_io.eraser_shapes(cfg, model).items()}
    eraser_io.save_erasers(root / "int_erasers", cfg, eraser_io.unflatten_phi(cfg, flat), model.config)
    st = root / "int_erasers" / eraser_io.WEIGHTS_NAME
    t = load_file(st)
    t["down.kernel"] = t["down.kernel"].astype(np.int16)
    save_file(t, st)
    return root


def _tool(name, *args):
    r = subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stderr.strip()


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in last, (n, last)


def test_diffusers_to_jax_refuses_and_overwrites_only_ours(tiny, tmp_path):
    tool = "diffusers_to_jax.py"
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (user, afile):
        rc, err = _tool(tool, tiny / "model", out, "--overwrite")
        _one_line_error(rc, err, str(out), "--overwrite")
    assert (user / "keep.txt").read_text() == "mine" and afile.read_text() == "mine"
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"]
    rc, err = _tool(tool, tiny / "int_model", tmp_path / "x")
    _one_line_error(rc, err, "norm_out.linear.weight", "int32", "floating point")
    assert not (tmp_path / "x").exists()

    out = tmp_path / "ckpt"
    assert _tool(tool, tiny / "model", out)[0] == 0
    assert is_ours(out)
    rc, err = _tool(tool, tiny / "model", out)
    _one_line_error(rc, err, str(out), "pass --overwrite")
    (out / "old_marker_check").write_text("x")  # a user's file inside our output: refused even with --overwrite
    _one_line_error(*_tool(tool, tiny / "model", out, "--overwrite"), "old_marker_check")
    (out / "old_marker_check").unlink()
    rc, err = _tool(tool, tiny / "model", out, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "params", "unlearn_jax_checkpoint.json"])


def test_jax_to_diffusers_refuses_user_mistakes(tiny, tmp_path):
    tool = "jax_to_diffusers.py"
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    _one_line_error(*_tool(tool, tiny / "model", user, "--overwrite"), str(user), "did not write")
    assert (user / "keep.txt").read_text() == "mine"
    _one_line_error(*_tool(tool, tiny / "int_model", tmp_path / "a"), "int32")
    _one_line_error(*_tool(tool, tiny / "int_erasers", tmp_path / "b", "--format", "t2vunlearning"),
                    "down.kernel", "int16")
    _one_line_error(*_tool(tool, tiny / "model", tiny / "model" / "inside"), "input")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _one_line_error(*_tool(tool, tiny / "model", afile / "out"), str(afile))  # a file where a folder must go
    _one_line_error(*_tool(tool, tiny / "model", tmp_path / "c", "--dtype", "int8"), "--dtype")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "user"]

    out = tmp_path / "back"
    rc, err = _tool(tool, tiny / "model", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "config.json",
                                                            "diffusion_pytorch_model.safetensors"])
    _one_line_error(*_tool(tool, tiny / "model", out), "pass --overwrite")
    assert _tool(tool, tiny / "model", out, "--overwrite")[0] == 0


def test_non_floating_orbax_checkpoint_is_refused_by_the_loader(tmp_path):
    import unlearn_jax
    from unlearn_jax.families import ORBAX_MARKER

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ORBAX_MARKER).write_text(json.dumps({"family": "CogVideoXTransformer3DModel", "config": {},
                                               "dtypes": {"a": "float32", "b": "bfloat16", "c": "int8", "d": "uint8"}}))
    with pytest.raises(UnlearnError, match=r"tensor c is int8 \(and 1 more\); weights must be floating point") as e:
        unlearn_jax.load_transformer(ck)
    assert "\n" not in str(e.value)