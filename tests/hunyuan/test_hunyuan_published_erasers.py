"""The authors' published HunyuanVideo eraser format: a file written here with the authors' module layout
(`single_transformer_blocks.{i}.attn.adapter` = up(gelu(down(h))) on the video part of the single-stream
attention output, the eraser weight a scale on it) gives the same velocity in diffusers (the authors'
semantics hooked in by hand) and in JAX; ours -> published -> ours is bit-exact; `unlearn_jax.torch.
attach_erasers` reads it too."""
import json

import jax
import numpy as np
import pytest
import torch

import unlearn_jax
import unlearn_jax.torch as ujt
from helpers_hunyuan import build_torch, cond_of, inputs, tiny_config, torch_forward
from unlearn_jax import eraser_io, export
from unlearn_jax.erasers import EraserConfig, init_erasers
from unlearn_jax.errors import ModelFamilyError

RANK, SCALE = 5, 0.6


class _AuthorsAdapter(torch.nn.Module):  # the state-dict layout of the authors' adapter eraser
    def __init__(self, dim, rank):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.act = torch.nn.GELU()
        self.up = torch.nn.Linear(rank, dim)

    def forward(self, h):
        return self.up(self.act(self.down(h)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config("distilled")
    tm = build_torch(cfg, seed=7)
    folder = tmp_path_factory.mktemp("hunyuan_published") / "transformer"
    tm.save_pretrained(folder)
    authors = folder.parent / "authors"
    authors.mkdir()
    torch.manual_seed(3)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mods = [_AuthorsAdapter(dim, RANK) for _ in range(cfg["num_single_layers"])]
    with torch.no_grad():  # the authors' up starts at zero; a trained one does not
        for m in mods:
            m.up.weight.normal_(0, 0.2), m.up.bias.normal_(0, 0.1)
    torch.save({f"single_transformer_blocks.{i}.attn.adapter": m.state_dict() for i, m in enumerate(mods)},
               authors / "eraser_weights.pt")
    (authors / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": RANK}))
    return cfg, tm, folder, authors, mods


def _authors_velocity(tm, mods, args, scale):
    """diffusers' model with the authors' adapters: scale * adapter(video part) added to each single-stream
    block's attention output (forward hooks written here, not the project's attach_erasers)."""
    def hook(m):
        return lambda mod, a, out: (out[0] + scale * m(out[0]), out[1])

    handles = [blk.attn.register_forward_hook(hook(m)) for blk, m in zip(tm.single_transformer_blocks, mods)]
    try:
        return torch_forward(tm, args)
    finally:
        for h in handles:
            h.remove()


def test_published_file_gives_the_same_velocity_in_diffusers_and_jax(setup):
    cfg, tm, folder, authors, mods = setup
    args = inputs(cfg, batch=2, seed=4)
    want = _authors_velocity(tm, mods, args, SCALE)
    assert np.abs(want - torch_forward(tm, args)).max() > 1e-3  # the adapters matter
    erased = unlearn_jax.load_transformer(folder, erasers=authors)
    got = np.asarray(erased(**args, scale=SCALE))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)  # the transformer's parity tolerance
    # the project's torch attach reads the same file (the eraser weight as its scale)
    t2 = ujt.attach_erasers(tm, authors, scale=SCALE)
    try:
        np.testing.assert_allclose(torch_forward(t2, args), want, atol=1e-5, rtol=0)
    finally:
        ujt.detach_erasers(t2)


def test_ours_to_published_to_ours_is_bit_exact(setup, tmp_path):
    cfg, _, folder, _, _ = setup
    model = unlearn_jax.load_transformer(folder)
    ec = EraserConfig("adapter", rank=RANK)
    phi = jax.tree.map(lambda a: a + 0.03 * jax.random.normal(jax.random.key(a.size), a.shape),
                       init_erasers(ec, model, jax.random.key(1)))
    export.export_t2vunlearning(tmp_path / "pub", ec, phi, model)
    ckpt = torch.load(tmp_path / "pub" / "eraser_weights.pt", weights_only=True)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert sorted(ckpt) == [f"single_transformer_blocks.{i}.attn.adapter" for i in range(cfg["num_single_layers"])]
    assert {k: tuple(v.shape) for k, v in ckpt["single_transformer_blocks.0.attn.adapter"].items()} == {
        "down.weight": (RANK, dim), "down.bias": (RANK,), "up.weight": (dim, RANK), "up.bias": (dim,)}
    (tmp_path / "pub" / "eraser_weights.safetensors").unlink(missing_ok=True)  # the .pt alone, as published
    cfg_back, phi_back = eraser_io.load_erasers(tmp_path / "pub", model)
    assert cfg_back == ec
    jax.tree.map(np.testing.assert_array_equal, phi_back, phi)
    # and the erased velocity through the file equals the one in memory
    args = inputs(cfg, batch=2, seed=5)
    from unlearn_jax.erased_model import attach_erasers

    np.testing.assert_array_equal(np.asarray(unlearn_jax.load_transformer(folder, erasers=tmp_path / "pub")(**args)),
                                  np.asarray(attach_erasers(model, (ec, phi))(**args)))


def test_a_cogvideox_file_is_refused_for_hunyuan(setup, tmp_path):
    _, _, folder, _, _ = setup
    (tmp_path / "cog").mkdir()
    torch.save({"transformer_blocks.0.attn1.adapter": _AuthorsAdapter(30, RANK).state_dict()},
               tmp_path / "cog" / "eraser_weights.pt")
    (tmp_path / "cog" / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": RANK}))
    with pytest.raises(ModelFamilyError, match="holds CogVideoX erasers.*not HunyuanVideo's single_transformer_blocks") as e:
        unlearn_jax.load_transformer(folder, erasers=tmp_path / "cog")
    assert "\n" not in str(e.value)
