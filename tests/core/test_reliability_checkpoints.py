"""Checkpoint checksums (unlearn_jax.checkpoint_integrity): a corrupt latest step is found and skipped for
the previous good one, saying so; orbax ignores the manifest and the quarantined step."""
import json

import pytest

from unlearn_jax import checkpoint_integrity as ci
from unlearn_jax import exit_codes


def _fake_step(ckpts, step, size=4096):
    d = ckpts / str(step)
    (d / "default" / "d").mkdir(parents=True)
    (d / "_CHECKPOINT_METADATA").write_text(json.dumps({"step": step}))
    (d / "default" / "d" / "shard0").write_bytes(bytes((step * 7 + i) % 251 for i in range(size)))
    ci.write_manifest(d)
    return d


def _corrupt(path, offset=1000, n=64):
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(255 - b for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def test_corrupt_latest_is_skipped_for_the_previous(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        _fake_step(ckpts, s)
    assert ci.latest_good_step(ckpts) == (6, None)
    assert ci.verify(ckpts / "6").ok
    _corrupt(ckpts / "6" / "default" / "d" / "shard0")
    v = ci.verify(ckpts / "6")
    assert not v and v.status == "corrupt" and "default/d/shard0: sha256 differs" in v.reason
    step, msg = ci.latest_good_step(ckpts)
    assert step == 4
    assert "step 6 (corrupt" in msg and "resuming from step 4" in msg and "\n" not in msg
    with pytest.raises(ci.CheckpointCorrupt, match="checkpoint is corrupt") as e:
        ci.require_valid(ckpts / "6")
    assert exit_codes.for_exception(e.value) == exit_codes.CHECKPOINT_CORRUPT
    moved = ci.quarantine(ckpts / "6")
    assert moved.name == "6.corrupt" and sorted(ci.step_dirs(ckpts)) == [2, 4]
    assert ci.latest_good_step(ckpts) == (4, None)


def test_every_kind_of_damage_is_named(tmp_path):
    ckpts = tmp_path / "checkpoints"
    d = _fake_step(ckpts, 1)
    (d / "default" / "d" / "shard0").write_bytes(b"short")
    (d / "extra").write_text("x")
    (d / "_CHECKPOINT_METADATA").unlink()
    reason = ci.verify(d).reason
    assert "_CHECKPOINT_METADATA is missing" in reason and "extra is not in the manifest" in reason
    assert "has 5 bytes, 4096 were written" in reason
    (d / ci.MANIFEST_NAME).write_text("{not json")
    assert ci.verify(d).reason == f"{ci.MANIFEST_NAME} is unreadable"
    step, msg = ci.latest_good_step(ckpts)
    assert step is None and "no good checkpoint" in msg
    assert ci.latest_good_step(tmp_path / "none") == (None, None)


def test_steps_without_manifest(tmp_path):
    # Written before checksums existed: restored, unverified, saying so.
    old = tmp_path / "old"
    for s in (1, 2):
        (old / str(s)).mkdir(parents=True)
        (old / str(s) / "f").write_text("x")
    step, msg = ci.latest_good_step(old)
    assert step == 2 and "unverified" in msg
    # The run stopped between a save and its manifest: that step is skipped for the verified one.
    new = tmp_path / "new"
    _fake_step(new, 3)
    (new / "5").mkdir()
    (new / "5" / "f").write_text("x")
    (new / "7.orbax-checkpoint-tmp-123").mkdir()  # orbax's unfinished saves are not steps
    step, msg = ci.latest_good_step(new)
    assert step == 3 and "step 5 (unverified" in msg


def test_with_orbax_checkpoint_manager(tmp_path):
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    state = {"phi": jnp.arange(3000.0).reshape(30, 100), "step": jnp.int32(0)}
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    ckpts = (tmp_path / "checkpoints").absolute()
    with ocp.CheckpointManager(ckpts, options=opts) as m:
        for s in (1, 2, 3):
            m.save(s, args=ocp.args.StandardSave({**state, "step": jnp.int32(s)}), force=True)
            m.wait_until_finished()
            ci.write_manifest(ckpts / str(s))
    assert sorted(ci.step_dirs(ckpts)) == [2, 3]  # retention removed step 1 with its manifest
    assert all(v.ok for _, v in ci.check_steps(ckpts))
    biggest = max((p for p in (ckpts / "3").rglob("*") if p.is_file() and p.name != ci.MANIFEST_NAME),
                  key=lambda p: p.stat().st_size)
    _corrupt(biggest, offset=biggest.stat().st_size // 2)
    step, msg = ci.latest_good_step(ckpts)
    assert step == 2 and "step 3 (corrupt" in msg
    ci.quarantine(ckpts / "3")
    with ocp.CheckpointManager(ckpts, options=opts) as m:
        assert m.latest_step() == 2
        restored = m.restore(2, args=ocp.args.StandardRestore(state))
        assert int(restored["step"]) == 2
        np.testing.assert_array_equal(np.asarray(restored["phi"]), np.asarray(state["phi"]))
        m.save(3, args=ocp.args.StandardSave(state), force=True)  # the quarantined step can be saved again
        m.wait_until_finished()
    ci.write_manifest(ckpts / "3")
    assert ci.latest_good_step(ckpts) == (3, None)
    assert (ckpts / "3.corrupt").is_dir()  # kept for inspection, nothing deleted
