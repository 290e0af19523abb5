"""Every erase-config field is checked before any work, with its allowed range in a one-line message
(unlearn_jax.erase_checks), and a resume that changes the training trajectory is refused."""
import json

import pytest

from unlearn_jax import erase_checks as E
from unlearn_jax.config import load_config
from unlearn_jax.erase_config import default_config
from unlearn_jax.errors import UnlearnError
from repo_paths import ROOT

INF, NAN = float("inf"), float("nan")


def _cfg(**fields):
    c = default_config()
    c.model.path = "/some/pipeline"
    for dotted, value in fields.items():
        node = c
        *parents, last = dotted.split("__")
        for k in parents:
            node = node[k]
        with node.ignore_type():
            node[last] = value
    return c


def _refused(cfg, *needles):
    with pytest.raises(UnlearnError) as e:
        E.validate_erase_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_default_and_shipped_configs_pass():
    E.validate_erase_config(_cfg())
    files = sorted((ROOT / "configs").rglob("*.py"))
    assert len(files) >= 4
    for f in files:
        c = load_config(f)
        if c.model.path is None:
            c.model.path = "/x"
        assert E.problems(c) == [], f


# (field, bad values, what the message says is allowed)
RANGES = [
    ("train.num_steps", [0, -3, 2.5, True], "an integer >= 1"),
    ("train.batch_size", [0, -1], "an integer >= 1"),
    ("train.learning_rate", [0.0, -1.0, INF, NAN, "1e-4"], "a finite number > 0"),
    ("train.checkpoint_every", [0], "an integer >= 1"),
    ("train.log_every", [0], "an integer >= 1"),
    ("train.keep_checkpoints", [0], "an integer >= 1"),
    ("train.grad_clip", [INF, NAN], "a finite number (<= 0 turns clipping off)"),
    ("train.adam_b1", [1.0, -0.1, 1.5], "a number in [0, 1)"),
    ("train.adam_b2", [1.0], "a number in [0, 1)"),
    ("train.adam_eps", [0.0, -1e-8], "a finite number > 0"),
    ("train.weight_decay", [-0.1], "a finite number >= 0"),
    ("erase.eta", [0.0, -3.0, NAN], "a finite number > 0 (a negative eta pushes the model toward the concept"),
    ("erase.alpha_loc", [-1.0, INF], "a finite number >= 0"),
    ("erase.beta_pre", [-0.5], "a finite number >= 0"),
    ("erase.mask_threshold", [-0.1, 1.5], "a number in [0, 1]"),
    ("erase.mask_key_chunk", [0], "an integer >= 1"),
    ("erase.mask_mode", ["max"], "one of per_layer, average"),
    ("eraser.rank", [0, -4], "an integer >= 1"),
    ("eraser.scale", [INF, NAN], "a finite number"),
    ("eraser.kind", ["dora"], "one of adapter, lora, attn, full"),
    ("sampler.num_steps", [0], "an integer >= 1"),
    ("sampler.guidance_scale", [-1.0, INF], "a finite number >= 0"),
    ("sampler.bank_size", [0], "an integer >= 1"),
    ("sampler.kind", ["euler"], "one of ddim, dpm, flow_euler"),  # and whatever schedulers.KINDS adds
    ("sampler.timestep_mode", ["random"], "one of sampler, esd_legacy"),
    ("sampler.xt_source", ["bank"], "one of current, frozen_bank"),
    ("video.num_frames", [0], "an integer >= 1"),
    ("video.height", [0, -8], "an integer >= 1"),
    ("video.width", [0], "an integer >= 1"),
    ("prompts.num_augmented", [-1], "an integer >= 0"),
    ("prompts.max_concept_tokens", [0], "an integer >= 1"),
    ("prompts.augment", ["llm"], "one of none, offline, file"),
    ("prompts.token_fallback", ["some"], "one of all, none"),
    ("evaluate.n", [0], "an integer >= 1"),
    ("evaluate.num_steps", [0], "an integer >= 1"),
    ("evaluate.guidance_scale", [-2.0], "a finite number >= 0"),
    ("evaluate.seed", [-1], "an integer in [0, 4294967295]"),
    ("evaluate.erased_concepts", ["colour:red", [""]], "a list of non-empty strings"),
    ("evaluate.toy_world", ["yes"], "true or false"),
    ("model.dtype", ["int8", "float64"], "one of float32, bfloat16, float16"),
    ("model.param_dtype", ["fp8"], "one of float32, bfloat16, float16"),
    ("model.text_dtype", ["int4"], "one of float32, bfloat16, float16 (or None)"),
    ("model.attention", ["flash"], "one of reference, chunked, xla, cudnn, auto"),
    ("model.attention_chunk", [0], "an integer >= 1"),
    ("model.remat", ["some"], "one of none, full, dots"),
    ("seed", [-1, 2**32, 1.5], "an integer in [0, 4294967295] (JAX keys take 32-bit seeds)"),
    ("workdir", ["", "  "], "a non-empty string"),
    ("distributed.enabled", [1], "true or false"),
    ("distributed.num_processes", [0], "an integer >= 1 (or None)"),
    ("distributed.process_id", [-1], "an integer >= 0 (or None)"),
    ("distributed.cpu_collectives", ["nccl"], "one of gloo, mpi, megascale (or None)"),
]


@pytest.mark.parametrize("field,bad,allowed", RANGES, ids=[r[0] for r in RANGES])
def test_each_range(field, bad, allowed):
    for value in bad:
        msg = _refused(_cfg(**{field.replace(".", "__"): value}), f"config.{field}=", allowed)
        assert msg.startswith(f"config.{field}="), msg  # one problem: just that one line


def test_every_leaf_field_has_a_rule():
    structured = {"concepts", "mesh.shape", "mesh.rules", "export.formats"}
    fields = set(E._fields(E._plain(default_config())))
    assert fields - set(E.rules()) == structured
    assert set(E.rules()) <= fields


def test_good_edge_values_pass():
    E.validate_erase_config(_cfg(train__adam_b1=0.0, erase__mask_threshold=1.0, erase__alpha_loc=0.0,
                                 train__grad_clip=0.0, prompts__num_augmented=0, sampler__guidance_scale=0.0,
                                 seed=2**32 - 1, model__dtype="bf16", sampler__kind="dpm", eraser__scale=-1.0))


def test_model_path_unset():
    c = _cfg()
    c.model.path = None
    _refused(c, "config.model.path is not set: pass --config.model.path=")


def test_unknown_fields_and_sections():
    c = _cfg()
    c.train.num_step = 5  # a typo in a config file: silently ignored before
    _refused(c, "config.train.num_step: no such field (did you mean train.num_steps?)")
    c = _cfg()
    c.extra = 1
    _refused(c, "config.extra: no such field")
    c = _cfg()
    with c.ignore_type():
        c.train = 5
    _refused(c, "config.train=5: must be a section")


def test_concepts():
    _refused(_cfg(concepts=[]), "config.concepts: must be a non-empty list")
    _refused(_cfg(concepts=[{"type": "nudity"}]), "config.concepts[0].phrase=None: must be a non-empty string")
    _refused(_cfg(concepts=[{"phrase": "cat", "kind": "x"}]), "config.concepts[0]: unknown keys ['kind']")
    _refused(_cfg(concepts=[{"phrase": "cat", "type": "animal"}]), "config.concepts[0].type='animal': must be one of")
    _refused(_cfg(concepts=[{"phrase": "cat", "eta": -2.0}]), "config.concepts[0].eta=-2.0: must be a finite number > 0")
    _refused(_cfg(concepts=[{"phrase": "cat", "preserve": "dog"}]), "config.concepts[0].preserve='dog'")
    _refused(_cfg(concepts=[{"phrase": "cat"}, {"phrase": "cat"}]), "'cat' is given twice")
    _refused(_cfg(concepts=["cat"]), "config.concepts[0]: must be a dict")
    E.validate_erase_config(_cfg(concepts=[{"phrase": "cat", "type": "object", "eta": 5.0, "preserve": ["dog"],
                                            "prompts": ["a cat"], "aliases": ["kitten"]}]))


def test_mesh():
    _refused(_cfg(mesh__shape={"data": -1, "fsdp": -1}), "-1 (the remaining devices) is allowed for one axis only")
    _refused(_cfg(mesh__shape={"data": 0}), "config.mesh.shape.data=0: must be an integer >= 1, or -1")
    _refused(_cfg(mesh__shape={"data": 1.5}), "config.mesh.shape.data=1.5")
    _refused(_cfg(mesh__shape={}), "config.mesh.shape={}")
    _refused(_cfg(mesh__rules=[("embed",)]), "config.mesh.rules=")
    E.validate_erase_config(_cfg(mesh__shape={"data": 2, "fsdp": -1}, mesh__rules=[("embed", "fsdp"),
                                                                                   ("heads", None),
                                                                                   ("batch", ["data", "fsdp"])]))


def test_exports_and_cross_field_rules():
    _refused(_cfg(export__formats=["onnx"]), "unknown format 'onnx'")
    _refused(_cfg(export__formats=["erasers", "erasers"]), "'erasers' is listed twice")
    _refused(_cfg(export__formats=["lora"]), "'lora' cannot hold adapter erasers")
    _refused(_cfg(export__formats=["t2vunlearning"], eraser__kind="lora"), "cannot hold lora erasers")
    E.validate_erase_config(_cfg(export__formats=["erasers", "lora", "diffusers"], eraser__kind="lora"))
    _refused(_cfg(prompts__augment="file"), "prompts.augment='file' needs config.prompts.file")
    _refused(_cfg(distributed__num_processes=2, distributed__process_id=2), "must be in [0, num_processes - 1]")
    _refused(_cfg(distributed__coordinator_address="h:1234"), "needs num_processes and process_id")


def test_many_problems_in_one_line():
    msg = _refused(_cfg(train__num_steps=0, erase__eta=-3.0, train__learning_rate=-1.0), "3 problems in the config:",
                   "train.num_steps=0", "erase.eta=-3.0", "train.learning_rate=-1.0")
    assert msg.count(";") >= 2


def test_choices_come_from_their_sources():
    from unlearn_jax import erasers, schedulers

    ch = E.choices()
    assert ch["eraser_kinds"] == erasers.KINDS and ch["samplers"] == schedulers.KINDS
    assert set(ch["concept_keys"]) >= {"phrase", "type", "eta", "preserve", "prompts", "aliases"}
    assert "xla" in ch["attention"] and "none" in ch["remat"] and "erasers" in ch["export_formats"]


# --------------------------------------------------------------------------------------------
# Resume: fields that change the trajectory
# --------------------------------------------------------------------------------------------
def test_every_field_is_classified():
    fields = set(E._fields(E._plain(default_config())))
    covered = set()
    for f in fields:
        if any(f == t or f.startswith(t + ".") for t in (*E.TRAJECTORY_FIELDS, *E.NOT_TRAJECTORY)):
            covered.add(f)
    assert covered == fields
    both = [f for f in E.TRAJECTORY_FIELDS if f in E.NOT_TRAJECTORY]
    assert not both


def _as_saved(cfg):
    from unlearn_jax.config import to_json

    return json.loads(to_json(cfg))  # what <workdir>/config.json holds


def test_trajectory_changes_named():
    old = _as_saved(_cfg())
    assert E.trajectory_changes(old, _cfg()) == []
    new = _cfg(train__batch_size=2, erase__eta=5.0, sampler__num_steps=10, seed=3,
               concepts=[{"phrase": "x"}], eraser__rank=8, video__height=240, prompts__num_augmented=3)
    assert E.trajectory_changes(old, new) == ["seed", "video.height", "concepts", "prompts.num_augmented",
                                              "sampler.num_steps", "erase.eta", "eraser.rank", "train.batch_size"]
    # Fields that do not change what is computed may change on resume.
    same = _cfg(train__num_steps=1000, train__checkpoint_every=7, model__attention="chunked", model__remat="full",
                mesh__shape={"data": 2, "fsdp": -1}, export__formats=[], workdir="elsewhere",
                model__path="/moved/pipeline", prompts__cache_dir="/cache")
    assert E.trajectory_changes(old, same) == []
    # An old config without a field added later counts as its default.
    del old["sampler"]["bank_size"]
    assert E.trajectory_changes(old, _cfg()) == []
    assert E.trajectory_changes(old, _cfg(sampler__bank_size=3)) == ["sampler.bank_size"]


def test_check_resume_message(tmp_path):
    old = _as_saved(_cfg())
    E.check_resume(old, _cfg(train__num_steps=900), tmp_path)
    with pytest.raises(UnlearnError) as e:
        E.check_resume(old, _cfg(train__batch_size=4), tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train.batch_size (1 -> 4)" in msg and "train.num_steps may grow" in msg
    assert "\n" not in msg


def test_config_file_argument(tmp_path):
    """`file.py:ARG` passes ARG to get_config (ml_collections' convention); mistakes are one line."""
    from unlearn_jax.errors import UnlearnError

    c = load_config(f"{ROOT / 'configs' / 'toy_world' / 'erase.py'}:shape:triangle")
    assert c.evaluate.erased_concepts == ["shape:triangle"] and c.concepts[0]["phrase"] == "triangle"
    assert c.workdir == "runs/toy_world/erase/shape_triangle" and E.problems(c) == []
    assert load_config(ROOT / "configs" / "toy_world" / "erase.py").evaluate.erased_concepts == ["colour:red"]
    with pytest.raises(UnlearnError, match=r"erase.py:colour:purple: unknown toy concepts"):
        load_config(f"{ROOT / 'configs' / 'toy_world' / 'erase.py'}:colour:purple")
    with pytest.raises(UnlearnError, match=r"get_config\(\) takes no argument; drop ':x'"):
        load_config(f"{ROOT / 'configs' / 'tiny_test.py'}:x")
    with pytest.raises(UnlearnError, match="no such config file"):
        load_config(tmp_path / "missing.py:x")
