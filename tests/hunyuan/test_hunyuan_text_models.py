"""HunyuanVideo's two text encoders in JAX equal transformers' LlamaModel (the hidden state the pipeline takes)
and CLIPTextModel (pooled and last hidden state) in fp32; their weights round-trip bit-exactly, their rule
tables cover the full-size models, and user mistakes are one-line errors."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from helpers_hunyuan_text import (CLIP_VARIANTS, LEFT_PAD, LLAMA_VARIANTS, ROW_LENGTHS, clip_inputs, llama_inputs,
                                  tiny_clip, tiny_llama)
from repo_paths import MODEL_CONFIGS
from unlearn_jax.conversion import (SafetensorsReader, module_targets, plan_import, write_module,
                                    write_safetensors)
from unlearn_jax.dtypes import as_dtype
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.models import clip, llama

TOL = dict(atol=1e-5, rtol=0)
LAYERS = (-3, -1, 0)  # the pipeline's default (skip 2), the final-normed state, the embeddings


@functools.partial(jax.jit, static_argnums=(0, 4))
def _llama_jit(graphdef, state, ids, mask, layer):
    return nnx.merge(graphdef, state).hidden_state(ids, mask, layer)


@functools.partial(jax.jit, static_argnums=(0,))
def _clip_jit(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def llama_forward(model, ids, mask, layer):
    graphdef, state = nnx.split(model)
    return np.asarray(_llama_jit(graphdef, state, ids, mask, layer))


def clip_forward(model, ids, mask=None):
    graphdef, state = nnx.split(model)
    return tuple(np.asarray(a) for a in _clip_jit(graphdef, state, ids, mask))


def torch_hidden_states(model, ids, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states]


def torch_clip(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        out = model(torch.from_numpy(ids), **kw)
    return out.last_hidden_state.float().numpy(), out.pooler_output.float().numpy()


def tensors_of(folder) -> dict:
    reader = SafetensorsReader(folder)
    try:
        return {k: reader.get(k) for k in reader.keys()}
    finally:
        reader.close()


def _saved(variant, build, load, tmp_path_factory):
    """(variant, torch model, its save_pretrained folder, our model loaded from it)."""
    tmodel = build(variant)
    folder = tmp_path_factory.mktemp(variant)
    tmodel.save_pretrained(folder)
    return variant, tmodel, folder, load(folder)


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    return {v: _saved(v, tiny_llama, llama.load_llama_encoder, tmp_path_factory) for v in sorted(LLAMA_VARIANTS)}


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    return {v: _saved(v, tiny_clip, clip.load_clip_text_encoder, tmp_path_factory) for v in sorted(CLIP_VARIANTS)}


@pytest.fixture(params=sorted(LLAMA_VARIANTS))
def llama_saved(request, llama_models):
    return llama_models[request.param]


@pytest.fixture(params=sorted(CLIP_VARIANTS))
def clip_saved(request, clip_models):
    return clip_models[request.param]


# --------------------------------------------------------------------------------------------
# Llama
# --------------------------------------------------------------------------------------------
def test_llama_hidden_states_equal_transformers(llama_saved):
    """Every real position of a padded batch, for hidden_states[-3], [-1] and [0]. Right padding: padded
    positions attend to all real tokens and match too. A left-padded row's leading positions see no key at all;
    there transformers' sdpa path (its default) and its eager path disagree, and ours equals eager's (a uniform
    average over all keys). HunyuanVideo pads on the right."""
    _, tmodel, _, model = llama_saved
    ids, mask = llama_inputs()
    want = torch_hidden_states(tmodel, ids, mask)
    default, tmodel.config._attn_implementation = tmodel.config._attn_implementation, "eager"
    try:
        eager = torch_hidden_states(tmodel, ids, mask)
    finally:
        tmodel.config._attn_implementation = default
    real = mask.astype(bool)
    right = np.arange(len(ROW_LENGTHS))
    for layer in LAYERS:
        got = llama_forward(model, ids, mask, layer)
        assert got.dtype == np.float32 and got.shape == want[layer].shape == (4, 13, 60)
        np.testing.assert_allclose(got[real], want[layer][real], **TOL, err_msg=f"layer {layer}")
        np.testing.assert_allclose(got[right], want[layer][right], **TOL, err_msg=f"layer {layer} right padding")
        np.testing.assert_allclose(got[-1, :LEFT_PAD], eager[layer][-1, :LEFT_PAD], **TOL)
    # the mask matters: a left-padded row's real tokens would otherwise attend to its padding
    unmasked = llama_forward(model, ids, np.ones_like(mask), -3)
    assert np.abs(unmasked[-1, LEFT_PAD:] - want[-3][-1, LEFT_PAD:]).max() > 1e-3


def test_llama_runs_only_the_layers_it_needs(llama_saved, tmp_path):
    """hidden_states[-3] of a 4-layer model is the output of layer 1: the scan runs 2 layers, and changing
    the last layers' weights leaves it (and hidden_states[3]) as it was."""
    variant, _, folder, model = llama_saved
    ids, mask = llama_inputs(seed=1)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, mask, layer=-3))(state))
    assert "length=2" in jaxpr and "length=4" not in jaxpr
    before = {layer: llama_forward(model, ids, mask, layer) for layer in (-3, 3, -1)}
    other = llama.load_llama_encoder(folder)
    kernel = other.layers.mlp.down_proj.kernel
    kernel[...] = kernel[...].at[3].set(0.0)
    np.testing.assert_array_equal(llama_forward(other, ids, mask, -3), before[-3])
    np.testing.assert_array_equal(llama_forward(other, ids, mask, 3), before[3])
    assert np.abs(llama_forward(other, ids, mask, -1) - before[-1]).max() > 1e-3
    assert model.hidden_state_index(-3) == 2 and model.hidden_state_index(4) == model.hidden_state_index(-1) == 4


def test_llama_rope_frequencies_equal_transformers(llama_saved):
    variant, tmodel, _, model = llama_saved
    inv = llama.rope_inverse_frequencies(model.config)
    np.testing.assert_allclose(inv, tmodel.rotary_emb.inv_freq.numpy(), rtol=1e-6, atol=0)
    plain = llama.rope_inverse_frequencies(llama.LlamaConfig(**{**vars(model.config), "rope_scaling": None}))
    if variant == "llama3_bias":  # long wavelengths slowed 8x, the middle ones blended, the short ones kept
        assert model.config.rope_scaling.factor == 8.0
        ratio = plain / inv
        assert ratio[0] == 1 and ratio[-1] == pytest.approx(8.0) and np.any((ratio > 1.01) & (ratio < 7.99))
    else:
        np.testing.assert_array_equal(inv, plain)
        assert model.config.rope_theta == 500000.0


@pytest.mark.parametrize("layout", ["causal_lm", "llava_v4", "llava_v5", "sharded"])
def test_llama_other_checkpoint_layouts(tmp_path, layout):
    """LlamaForCausalLM (`model.` prefix, lm_head ignored), transformers' LLaVA names (old and new: the vision
    tower and projector ignored, the config's text_config read) and a sharded checkpoint with an index."""
    from transformers import LlamaForCausalLM

    lm = tiny_llama("gqa", seed=2, cls=LlamaForCausalLM)
    if layout == "sharded":
        lm.model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    else:
        lm.save_pretrained(tmp_path)
    if layout.startswith("llava"):
        prefix = "language_model.model." if layout == "llava_v4" else "model.language_model."
        tensors = {prefix + k.removeprefix("model."): v for k, v in tensors_of(tmp_path).items()
                   if k != "lm_head.weight"}
        old = layout == "llava_v4"
        tensors.update({("" if old else "model.") + "vision_tower.encoder.layers.0.fc1.weight": np.ones((4, 3)),
                        ("language_model." if old else "") + "lm_head.weight": np.ones((101, 60), np.float32),
                        "multi_modal_projector.linear_1.weight": np.ones((60, 4), np.float32)})
        (tmp_path / "model.safetensors").unlink()
        write_safetensors(tmp_path / "model.safetensors", tensors)
        text = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": text,
                                                          "architectures": ["LlavaForConditionalGeneration"]}))
    model = llama.load_llama_encoder(tmp_path)
    ids, mask = llama_inputs(seed=3)
    want = torch_hidden_states(lm.model, ids, mask)[-3]
    got = llama_forward(model, ids, mask, -3)
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], **TOL)


@pytest.mark.parametrize("variant,dtype", [("gqa", torch.bfloat16), ("llama3_bias", torch.float32)])
def test_llama_round_trip_bit_exact(tmp_path, variant, dtype):
    """Checkpoint -> our params -> written back by the rule table: every tensor bit for bit, in its dtype;
    the written folder (our config.json) loads in transformers as the same model."""
    from transformers import LlamaModel

    src, out = tmp_path / "src", tmp_path / "out"
    tmodel = tiny_llama(variant, seed=4).to(dtype)
    tmodel.save_pretrained(src)
    model = llama.load_llama_encoder(src)  # dtype=None: the checkpoint's
    stored = as_dtype(str(dtype).removeprefix("torch."))
    assert model.layers.self_attn.q_proj.kernel[...].dtype == stored == model.dtype
    assert model.layers.input_layernorm.scale[...].dtype == jnp.float32
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_module(out, model, llama.rule_table(model.config), "model.safetensors", dtype=stored)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert llama.LlamaConfig.from_json(out / "config.json") == model.config
    back = LlamaModel.from_pretrained(out, dtype=dtype).eval()
    for k, v in tmodel.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if dtype == torch.float32:  # (`.to(bfloat16)` also rounds the rotary buffer, from_pretrained does not)
        ids, mask = llama_inputs(seed=5)
        for x, y in zip(torch_hidden_states(back, ids, mask), torch_hidden_states(tmodel, ids, mask)):
            np.testing.assert_array_equal(x, y)


def test_llama_bf16_within_tolerance(llama_models):
    """bf16 weights and matmuls (fp32 residual, norms, rotary, softmax) against the fp32 reference."""
    _, tmodel, folder, _ = llama_models["gqa"]
    ids, mask = llama_inputs(seed=6)
    want = torch_hidden_states(tmodel, ids, mask)[-3]
    model = llama.load_llama_encoder(folder, dtype="bfloat16")
    assert model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    assert model.norm.scale[...].dtype == jnp.float32
    got = llama_forward(model, ids, mask, -3)
    real = mask.astype(bool)
    err = np.abs(got[real] - want[real]).max()
    assert 1e-6 < err <= 0.03 * np.abs(want[real]).max(), err


def test_llama_mesh_sharded_equals_single_device(llama_models):
    _, _, folder, model = llama_models["gqa"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    sharded = llama.load_llama_encoder(folder, mesh=mesh)
    # gate_proj (layers, embed=60, mlp=70): fsdp over embed (60/4), tensor over mlp (70/2)
    spec = sharded.layers.mlp.gate_proj.kernel[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids, mask = llama_inputs(seed=7)
    np.testing.assert_allclose(llama_forward(sharded, ids, mask, -3), llama_forward(model, ids, mask, -3),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------
def test_clip_outputs_equal_transformers(clip_saved):
    """As the pipeline calls it (no mask, pooler_output), and with a mask; pooled at the end token by the
    config's rule: the largest id for eos_token_id 2, else the first eos_token_id (position 0 when absent)."""
    variant, tmodel, _, model = clip_saved
    ids, mask = clip_inputs(variant)
    for m in (None, mask):
        want_h, want_p = torch_clip(tmodel, ids, m)
        got_h, got_p = clip_forward(model, ids, m)
        assert got_h.shape == want_h.shape == (3, 13, 60) and got_p.shape == want_p.shape == (3, 60)
        np.testing.assert_allclose(got_h, want_h, **TOL)
        np.testing.assert_allclose(got_p, want_p, **TOL)
    np.testing.assert_array_equal(clip.pooled_positions(ids, model.config.eos_token_id), [6, 9, 0])
    if variant == "eos_id":  # the legacy rule would pool at the begin token (the largest id) here
        np.testing.assert_array_equal(clip.pooled_positions(ids, 2), [0, 0, 0])
    # the mask matters for padded positions only (right padding, causal attention)
    unmasked, _ = clip_forward(model, ids)
    masked, _ = clip_forward(model, ids, mask)
    np.testing.assert_allclose(masked[mask.astype(bool)], unmasked[mask.astype(bool)], atol=1e-6, rtol=0)
    assert np.abs(masked[0, 7:] - unmasked[0, 7:]).max() > 1e-3


def test_clip_with_projection_checkpoint(tmp_path):
    """A CLIPTextModelWithProjection folder: `text_projection` is ignored, outputs equal CLIPTextModel's."""
    from transformers import CLIPTextModelWithProjection

    base = tiny_clip("legacy_eos", seed=3)
    proj = CLIPTextModelWithProjection(base.config).eval()
    proj.text_model.load_state_dict(base.state_dict())
    proj.save_pretrained(tmp_path)
    assert any(k.startswith("text_projection") for k in tensors_of(tmp_path))
    ids, _ = clip_inputs("legacy_eos", seed=1)
    got_h, got_p = clip_forward(clip.load_clip_text_encoder(tmp_path), ids)
    want_h, want_p = torch_clip(base, ids)
    np.testing.assert_allclose(got_h, want_h, **TOL)
    np.testing.assert_allclose(got_p, want_p, **TOL)


def test_clip_round_trip_bit_exact(tmp_path):
    """fp16 checkpoint (transformers v5 writes unprefixed names) -> ours -> written with the published
    `text_model.` names: bit for bit; transformers loads the written folder back to the same weights."""
    from transformers import CLIPTextModel

    src, out = tmp_path / "src", tmp_path / "out"
    tmodel = tiny_clip("legacy_eos", seed=5).to(torch.float16)
    tmodel.save_pretrained(src)
    model = clip.load_clip_text_encoder(src)
    assert model.layers.mlp.fc1.kernel[...].dtype == jnp.float16
    assert model.layers.layer_norm1.scale[...].dtype == jnp.float32
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_module(out, model, clip.rule_table(model.config), "model.safetensors", dtype=np.float16)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(clip.clip_key_renamer(k) for k in a) == sorted(b) and all(k.startswith("text_model.") for k in b)
    for k in a:
        got = b[clip.clip_key_renamer(k)]
        assert got.dtype == a[k].dtype == torch.float16 and torch.equal(got, a[k]), k
    assert clip.CLIPTextConfig.from_json(out / "config.json") == model.config
    back = CLIPTextModel.from_pretrained(out, dtype=torch.float16)
    for k, v in tmodel.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# --------------------------------------------------------------------------------------------
# Rule coverage against the full-size configs (meta device / shapes only, no weights)
# --------------------------------------------------------------------------------------------
def _check_coverage(table, abstract, torch_shapes: dict, where: str):
    targets = module_targets(abstract)
    plan = plan_import(table, torch_shapes, targets, where)  # raises listing every problem
    assert sum(len(v) for v in plan.values()) == len(torch_shapes) and all(plan[p] for p in targets)
    for e in table.entries():
        leaf = targets[e.jax_path].shape
        assert e.transform.torch_shape(leaf[1:] if e.layer is not None else leaf) == torch_shapes[e.torch_key], \
            e.torch_key
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == sum(int(np.prod(t.shape)) for t in targets.values())
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes)
    return targets


def test_llama_rule_table_covers_hunyuan_text_encoder():
    from transformers import LlamaConfig, LlamaModel

    raw = json.loads((MODEL_CONFIGS / "hunyuan_video_text_encoder.json").read_text())
    with torch.device("meta"):
        tmodel = LlamaModel(LlamaConfig.from_dict(raw))
    shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    cfg = llama.LlamaConfig.from_dict(raw)
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (32, 8, 128, 500000.0)
    abstract = llama.abstract_llama_encoder(cfg, dtype=jnp.bfloat16)
    targets = _check_coverage(llama.rule_table(cfg), abstract, shapes, "hunyuan text_encoder")
    assert targets["layers.self_attn.k_proj.kernel"].shape == (32, 4096, 1024)
    assert targets["embed_tokens"].shape == (128320, 4096)
    assert abstract.hidden_state_index(-3) == 30  # the pipeline's hidden state: 30 of 32 layers run


def test_clip_rule_table_covers_hunyuan_text_encoder_2():
    from transformers import CLIPTextConfig, CLIPTextModel

    raw = json.loads((MODEL_CONFIGS / "hunyuan_video_text_encoder_2.json").read_text())
    with torch.device("meta"):
        tmodel = CLIPTextModel(CLIPTextConfig.from_dict(raw))
    # transformers v5 holds the text model without the `text_model.` prefix of published checkpoints
    shapes = {clip.clip_key_renamer(k): tuple(v.shape) for k, v in tmodel.state_dict().items()}
    cfg = clip.CLIPTextConfig.from_dict(raw)
    assert cfg.legacy_pooling and cfg.hidden_act == "quick_gelu" and cfg.max_position_embeddings == 77
    targets = _check_coverage(clip.rule_table(cfg), clip.abstract_clip_text_encoder(cfg), shapes,
                              "hunyuan text_encoder_2")
    assert targets["layers.mlp.fc1.kernel"].shape == (12, 768, 3072)


# --------------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------------
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_wrong_folder_and_wrong_class_are_one_line_errors(tmp_path, llama_models, clip_models):
    _, _, llama_dir, _ = llama_models["gqa"]
    _, _, clip_dir, _ = clip_models["legacy_eos"]
    for load in (llama.load_llama_encoder, clip.load_clip_text_encoder):
        with pytest.raises(UnlearnError) as e:
            load(tmp_path / "nope")
        _one_line(e, "no such folder")
        with pytest.raises(UnlearnError) as e:
            load(tmp_path)
        _one_line(e, "no config.json")
    with pytest.raises(ModelFamilyError) as e:
        llama.load_llama_encoder(clip_dir)
    _one_line(e, "clip_text_model", "CLIPTextModel", "not a Llama text encoder", str(clip_dir))
    with pytest.raises(ModelFamilyError) as e:
        clip.load_clip_text_encoder(llama_dir)
    _one_line(e, "'llama'", "not a CLIP text encoder")
    for cfg, load, words in (
            ({"model_type": "t5", "architectures": ["T5EncoderModel"]}, llama.load_llama_encoder, ["'t5'"]),
            ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, llama.load_llama_encoder,
             ["LlamaForSequenceClassification"]),
            ({"model_type": "clip_text_model", "architectures": ["CLIPVisionModel"]}, clip.load_clip_text_encoder,
             ["CLIPVisionModel"]),
            ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "text_config": {"model_type": "mistral"}}, llama.load_llama_encoder, ["LLaVA"])):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelFamilyError) as e:
            load(tmp_path)
        _one_line(e, *words)
    # a pipeline folder: its text_encoder/ and text_encoder_2/ are found
    (tmp_path / "config.json").unlink()
    (tmp_path / "text_encoder").symlink_to(llama_dir)
    (tmp_path / "text_encoder_2").symlink_to(clip_dir)
    assert isinstance(llama.load_llama_encoder(tmp_path), llama.LlamaEncoder)
    assert isinstance(clip.load_clip_text_encoder(tmp_path), clip.CLIPTextEncoder)


def test_config_errors_are_one_line():
    base = dict(model_type="llama", hidden_size=60, num_attention_heads=6, intermediate_size=70, num_hidden_layers=2)
    for bad, words in ((dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), ["'yarn'"]),
                       (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3", "low_freq_factor"]),
                       (dict(num_key_value_heads=4), ["not a multiple of num_key_value_heads 4"]),
                       (dict(hidden_act="gelu"), ["hidden_act"]), (dict(head_dim=15), ["head_dim 15"]),
                       (dict(partial_rotary_factor=0.5), ["partial_rotary_factor"])):
        with pytest.raises(UnlearnError) as e:
            llama.LlamaConfig.from_dict({**base, **bad}, "cfg.json")
        _one_line(e, "cfg.json", *words)
    # v4's rope_theta + rope_scaling and v5's rope_parameters read the same
    v4 = llama.LlamaConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    v5 = llama.LlamaConfig.from_dict({**base, **{k: v for k, v in v4.to_dict().items() if k != "rope_scaling"}})
    assert v4 == v5 and v5.rope_scaling.original_max_position_embeddings == 8192 and v5.num_key_value_heads == 6
    with pytest.raises(UnlearnError) as e:
        clip.CLIPTextConfig.from_dict({"model_type": "clip_text_model", "hidden_act": "swiglu"}, "c.json")
    _one_line(e, "c.json", "swiglu")
    with pytest.raises(UnlearnError) as e:
        clip.CLIPTextConfig.from_dict({"model_type": "clip_text_model", "hidden_size": 60,
                                       "num_attention_heads": 7}, "c.json")
    _one_line(e, "num_attention_heads 7")
    full = clip.CLIPTextConfig.from_dict({"model_type": "clip", "architectures": ["CLIPModel"],
                                          "text_config": {"hidden_size": 768, "eos_token_id": 2}})
    assert full.hidden_size == 768 and full.legacy_pooling


def test_bad_inputs_and_misfit_weights_are_one_line(tmp_path, llama_models, clip_models):
    _, tmodel, _, model = llama_models["gqa"]
    _, _, _, cmodel = clip_models["legacy_eos"]
    ids, mask = llama_inputs()
    for kw, words in ((dict(layer=5), ["layer 5", "-5..4"]), (dict(layer=-6), ["layer -6"]),
                      (dict(attention_mask=mask[:, :5]), ["attention_mask shape"])):
        with pytest.raises(UnlearnError) as e:
            model(ids, **{"attention_mask": mask, **kw})
        _one_line(e, *words)
    with pytest.raises(UnlearnError) as e:
        model(ids[0])
    _one_line(e, "(batch, length)")
    with pytest.raises(UnlearnError) as e:
        cmodel(np.zeros((1, 16), np.int32))
    _one_line(e, "16 tokens", "max_position_embeddings=15")
    # weights that do not fit: every problem listed at once
    tmodel.save_pretrained(tmp_path)
    tensors = tensors_of(tmp_path)
    del tensors["layers.1.self_attn.k_proj.weight"], tensors["norm.weight"]
    tensors["layers.2.mlp.up_proj.weight"] = np.zeros((70, 61), np.float32)
    tensors["layers.0.self_attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(ConversionError) as e:
        llama.load_llama_encoder(tmp_path)
    _one_line(e, "layers.1.self_attn.k_proj.weight", "norm.weight", "layers.2.mlp.up_proj.weight",
              "layers.0.self_attn.qkv.weight", "Llama text encoder")
