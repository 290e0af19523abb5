"""The Flax T5 / UMT5 text encoder against transformers' PyTorch encoders, and its weight-name table."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers_text import tiny_torch_encoder
from unlearn_jax.conversion import (LINEAR, SafetensorsReader, Target, iter_torch_tensors, plan_import,
                                    write_safetensors)
from unlearn_jax.errors import ConversionError, ModelFamilyError
from unlearn_jax.models import t5
from repo_paths import MODEL_CONFIGS

XXL_CONFIG = str(MODEL_CONFIGS / "t5_v1_1_xxl_text_encoder.json")
# bf16 compute (fp32 residual stream, norms, softmax and `wo`) against the fp32 PyTorch reference:
# max |error| <= BF16_RTOL * max |reference| on the tiny randomized models. Measured: ~3.5e-3
# (transformers' own bf16 encoder: ~9e-3 against the same reference).
BF16_RTOL = 1e-2

VARIANTS = {
    "t5": dict(variant="t5"),
    "umt5": dict(variant="umt5"),
    "t5-relu": dict(variant="t5", feed_forward_proj="relu"),  # original T5's ungated FFN
}


def _inputs(vocab=100, seed=0):
    """A padded batch: lengths 24 (full), 13 and 5, ids up to `vocab`; long enough for the log buckets."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(3, 24))
    mask = np.ones_like(ids)
    for row, n in ((1, 13), (2, 5)):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
        mask[row, n:] = 0
    return ids, mask


def _torch_out(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(ids), **kw).last_hidden_state.float().numpy()


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    """(folder, torch model) of a randomized tiny encoder saved by `save_pretrained`."""
    kw = dict(VARIANTS[request.param])
    variant = kw.pop("variant")
    model = tiny_torch_encoder(variant, seed=1, **kw)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder, model


def test_fp32_parity_padded_batch(saved):
    folder, ref = saved
    enc = t5.load_text_encoder(folder)
    ids, mask = _inputs()
    for m in (mask, None):
        want = _torch_out(ref, ids, m)
        got = np.asarray(enc(ids, m))
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the mask matters: padded rows differ from the unmasked run
    assert np.abs(np.asarray(enc(ids, mask))[2] - np.asarray(enc(ids))[2]).max() > 1e-3


def test_bf16_within_tolerance(saved):
    folder, ref = saved
    ids, mask = _inputs()
    want = _torch_out(ref, ids, mask)
    enc = t5.load_text_encoder(folder, dtype=jnp.bfloat16)
    assert enc.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
    assert enc.blocks.attn_norm.scale[...].dtype == jnp.float32
    got = np.asarray(enc(ids, mask))
    assert got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= BF16_RTOL * np.abs(want).max(), err
    assert err > 1e-6  # really computed in bf16


def test_sharded_checkpoint_index(tmp_path):
    ref = tiny_torch_encoder("t5", seed=2)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask = _inputs()
    np.testing.assert_allclose(np.asarray(t5.load_text_encoder(tmp_path)(ids, mask)), _torch_out(ref, ids, mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys", ["encoder_only", "both"])
def test_embedding_under_either_name(tmp_path, keys):
    ref = tiny_torch_encoder("t5", seed=3)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    reader = SafetensorsReader(tmp_path)
    tensors = {k: reader.get(k) for k in reader.keys()}
    reader.close()
    shared = tensors.pop("shared.weight")
    tensors["encoder.embed_tokens.weight"] = shared
    if keys == "both":
        tensors["shared.weight"] = shared
    write_safetensors(path, tensors)
    ids, mask = _inputs()
    np.testing.assert_allclose(np.asarray(t5.load_text_encoder(tmp_path)(ids, mask)), _torch_out(ref, ids, mask),
                               atol=1e-5, rtol=0)


def test_export_gives_back_the_state_dict(saved):
    folder, ref = saved
    enc = t5.load_text_encoder(folder)
    specs, gen = iter_torch_tensors(t5.rule_table(enc.config), t5.param_leaves(enc))
    sd = {k: v.numpy() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert set(specs) == set(sd)
    for key, arr in gen:
        np.testing.assert_array_equal(arr, sd[key], err_msg=key)


def test_mesh_sharded_equals_single_device(tmp_path):
    ref = tiny_torch_encoder("umt5", seed=4)
    ref.save_pretrained(tmp_path)
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
    enc = t5.load_text_encoder(tmp_path, mesh=mesh)
    kernel = enc.blocks.ffn.wi_0.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids, mask = _inputs()
    np.testing.assert_allclose(np.asarray(enc(ids, mask)), np.asarray(t5.load_text_encoder(tmp_path)(ids, mask)),
                               atol=1e-5, rtol=0)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-600, 600)
    for nb, md in ((32, 128), (8, 20), (64, 256), (20, 100)):
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        # query 599 sees keys 0..1198 at relative positions -599..599
        got = t5.relative_position_buckets(600, 1199, nb, md)[599]
        np.testing.assert_array_equal(got, want.numpy()[1:], err_msg=f"{nb}/{md}")


# --------------------------------------------------------------------------------------------
# Rule table coverage against the full-size configs (abstract shapes, no weights)
# --------------------------------------------------------------------------------------------
def _umt5_xxl_config():
    cfg = json.loads(open(XXL_CONFIG).read())
    cfg.update(model_type="umt5", architectures=["UMT5EncoderModel"], vocab_size=256384)
    return cfg


@pytest.mark.parametrize("which", ["t5_xxl", "umt5_xxl"])
def test_rule_table_covers_full_size_encoder(which):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = json.loads(open(XXL_CONFIG).read()) if which == "t5_xxl" else _umt5_xxl_config()
    tcls, mcls = (T5Config, T5EncoderModel) if which == "t5_xxl" else (UMT5Config, UMT5EncoderModel)
    with torch.device("meta"):
        ref = mcls(tcls(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}))
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert "encoder.embed_tokens.weight" in torch_shapes  # tied; the loader reads shared.weight

    config = t5.T5EncoderConfig.from_dict(cfg)
    assert config.num_layers == 24 and config.gated and config.activation == "gelu_new"
    abstract = t5.abstract_text_encoder(config, dtype=jnp.bfloat16)
    from flax import nnx

    leaves = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    table = t5.rule_table(config)
    seen_leaves = set()
    for key, shape in torch_shapes.items():
        if key == "encoder.embed_tokens.weight":
            continue
        entry = table.match(key)
        assert entry is not None, f"no rule for {key}"
        leaf = leaves[entry.jax_path]
        want = leaf.shape[1:] if entry.layer is not None else leaf.shape
        assert tuple(entry.transform.jax_shape(shape)) == tuple(want), key
        seen_leaves.add(entry.jax_path)
    assert seen_leaves == set(leaves)
    # the same check through the import planner (every problem would be listed at once)
    targets = {p: Target(tuple(v.shape), v.dtype, None) for p, v in leaves.items()}
    plan_import(table, {k: s for k, s in torch_shapes.items() if k != "encoder.embed_tokens.weight"}, targets, which)
    # linears are transposed, norms and embeddings are not
    assert table.match("encoder.block.3.layer.1.DenseReluDense.wo.weight").transform is LINEAR
    assert leaves["blocks.ffn.wo.kernel"].shape == (24, 10240, 4096)
    assert leaves["shared"].shape == (cfg["vocab_size"], 4096)
    bias = "blocks.attn.rel_bias.embedding" if which == "umt5_xxl" else "rel_bias.embedding"
    assert leaves[bias].shape[-2:] == (32, 64)


# --------------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------------
def test_wrong_family_folder_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model",
                                                      "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ModelFamilyError) as e:
        t5.load_text_encoder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "clip_text_model" in msg and str(tmp_path) in msg
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["BertModel"]}))
    with pytest.raises(ModelFamilyError, match="BertModel"):
        t5.load_text_encoder(tmp_path)


def test_missing_and_misshaped_weights_are_listed_together(tmp_path):
    ref = tiny_torch_encoder("t5", seed=5)
    ref.save_pretrained(tmp_path)
    reader = SafetensorsReader(tmp_path)
    tensors = {k: reader.get(k) for k in reader.keys()}
    reader.close()
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
    del tensors["encoder.final_layer_norm.weight"]
    tensors["encoder.block.2.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 60), np.float32)
    tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(ConversionError) as e:
        t5.load_text_encoder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("encoder.block.1.layer.0.SelfAttention.k.weight", "encoder.final_layer_norm.weight",
                "encoder.block.2.layer.1.DenseReluDense.wo.weight",
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"):
        assert key in msg
