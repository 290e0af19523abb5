"""A plain PyTorch reference of one erasure iteration (docs/METHOD.md §2, §4, §5) on a stock diffusers
`CogVideoXTransformer3DModel`, for parity tests and benchmarks of the JAX training step.

    ref = ReferenceIteration(transformer, phi, latent_shape=(F, C, H, W), alpha_loc=1.0, beta_pre=1.0)
    x_t, t = ref.sample_xt(noise, ctx, uncond, j)          # (a) j DDIM steps with CFG, current erased model
    frozen = ref.frozen_passes(x_t, t, batch)              # (b) v_neg, localization masks, frozen v_pre
    terms = ref.loss_and_grads(x_t, t, batch, frozen)      # (c) erased forward + backward ...
    ref.adam_step()                                        #     ... + one (clipped) Adam step on the adapters
    ref.close()                                            # removes the hooks

Written the literal way, independent of the JAX code: the adapters are plain tensors applied by a forward
hook on each block's `attn1` (video part of its output), the query/key projections are read by forward
hooks on `attn1.to_q` / `attn1.to_k`, the localization map is the full per-head softmax attention matrix
(mean over heads, video-query x concept-key block), and sampling goes through diffusers'
`CogVideoXDDIMScheduler` with the rotary embedding `CogVideoXPipeline` prepares. Like the JAX step, the
unconditional and conditional frozen passes run as one batched call ([uncond; cond]), and the erased
passes on x_t and x_pre as one call ([x_t; x_pre]). `torch.no_grad()` covers sampling and the frozen
passes, exactly where the JAX step stops gradients.

Adapter parameters come in the JAX layout (`unlearn_jax.erasers`: down.kernel (L, dim, rank),
down.bias (L, rank), up.kernel (L, rank, dim), up.bias (L, dim)) as any array-likes; gradients are
returned in the same layout as numpy arrays. Never imports JAX.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_LEAVES = (("down", "kernel", "dw"), ("down", "bias", "db"), ("up", "kernel", "uw"), ("up", "bias", "ub"))


# --------------------------------------------------------------------------------------------
# Geometry: the rotary embedding of the pipeline, the token grid
# --------------------------------------------------------------------------------------------
def pipeline_rope(config, latent_frames: int, height: int, width: int):
    """(cos, sin) exactly as `CogVideoXPipeline._prepare_rotary_positional_embeddings` makes them for
    latents of `latent_frames` x `height` x `width`; None for models without RoPE."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if not get("use_rotary_positional_embeddings", False):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, pt = get("patch_size", 2), get("patch_size_t", None)
    gh, gw = height // p, width // p
    base_w, base_h = get("sample_width") // p, get("sample_height") // p
    hd = get("attention_head_dim")
    if pt is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=hd, crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=latent_frames)
    return get_3d_rotary_pos_embed(embed_dim=hd, crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(latent_frames + pt - 1) // pt, grid_type="slice",
                                   max_size=(base_h, base_w))


def token_grid(config, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F_tokens, H_tokens, W_tokens) of the video tokens."""
    p, pt = config.patch_size, config.patch_size_t
    return (latent_frames if pt is None else (latent_frames + pt - 1) // pt), height // p, width // p


# --------------------------------------------------------------------------------------------
# Adapter parameters: JAX layout <-> torch leaf tensors (nn.Linear layout: weight (out, in))
# --------------------------------------------------------------------------------------------
def adapter_tensors(phi) -> list[dict[str, torch.Tensor]]:
    """Per-layer trainable torch tensors {dw, db, uw, ub} from adapter params in the JAX layout."""
    arrays = {short: np.asarray(phi[g][n], np.float32) for g, n, short in _LEAVES}
    out = []
    for l in range(arrays["dw"].shape[0]):
        layer = {}
        for short, a in arrays.items():
            a = a[l].T if short in ("dw", "uw") else a[l]
            layer[short] = torch.tensor(np.ascontiguousarray(a), dtype=torch.float32, requires_grad=True)
        out.append(layer)
    return out


def adapter_arrays(params: list[dict[str, torch.Tensor]], grad: bool = False) -> dict:
    """The params (or their .grad) back in the JAX layout, as numpy arrays."""
    def get(p, short):
        t = p[short].grad if grad else p[short].detach()
        a = t.numpy()
        return a.T if short in ("dw", "uw") else a

    return {g: {n: np.stack([get(p, short) for p in params]) for gg, n, short in _LEAVES if gg == g}
            for g in ("down", "up")}


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


# --------------------------------------------------------------------------------------------
# The iteration
# --------------------------------------------------------------------------------------------
class ReferenceIteration:
    """One erasure iteration on a diffusers CogVideoX transformer with T2VUnlearning adapters.

    transformer: `CogVideoXTransformer3DModel` (its weights stay frozen: requires_grad is turned off).
    phi: adapter params in the JAX layout (see module doc); copied into trainable torch tensors.
    latent_shape: (F, C, H, W) of the latents.
    scheduler: a `CogVideoXDDIMScheduler` (or compatible) instance, or a config path/dict; only
        `sample_xt` needs it.
    """

    def __init__(self, transformer, phi, *, latent_shape, alpha_loc: float = 1.0, beta_pre: float = 1.0,
                 mask_threshold: float = 0.1, guidance_scale: float = 3.0, num_sampler_steps: int = 50,
                 scheduler=None, learning_rate: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 grad_clip: float = 1.0):
        self.model = transformer
        for p in transformer.parameters():
            p.requires_grad_(False)
        cfg = transformer.config
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.num_layers = len(transformer.transformer_blocks)
        f, _, h, w = latent_shape
        self.latent_shape = tuple(latent_shape)
        self.grid = token_grid(cfg, f, h, w)
        self.rope = pipeline_rope(cfg, f, h, w)
        self.alpha, self.beta, self.tau = float(alpha_loc), float(beta_pre), float(mask_threshold)
        self.guidance_scale, self.num_sampler_steps = float(guidance_scale), int(num_sampler_steps)
        self.params = adapter_tensors(phi)
        if len(self.params) != self.num_layers:
            raise ValueError(f"{len(self.params)} adapters for {self.num_layers} blocks")
        self.flat_params = [p[s] for p in self.params for s in ("dw", "db", "uw", "ub")]
        self.optimizer = torch.optim.Adam(self.flat_params, lr=learning_rate, betas=betas, eps=eps)
        self.grad_clip = grad_clip
        self.scheduler = self._scheduler(scheduler)
        # hook state: adapters on/off, collect adapter outputs, capture q/k projections
        self.adapters_on, self.collect, self.capture_qk = False, False, False
        self.outs: list[torch.Tensor] = []
        self.qs: list[torch.Tensor] = []
        self.ks: list[torch.Tensor] = []
        self._handles = []
        for l, blk in enumerate(transformer.transformer_blocks):
            self._handles.append(blk.attn1.register_forward_hook(self._adapter_hook(l)))
            self._handles.append(blk.attn1.to_q.register_forward_hook(self._capture(self.qs)))
            self._handles.append(blk.attn1.to_k.register_forward_hook(self._capture(self.ks)))

    @staticmethod
    def _scheduler(scheduler):
        if scheduler is None or hasattr(scheduler, "step"):
            return scheduler
        from diffusers import CogVideoXDDIMScheduler

        if isinstance(scheduler, dict):
            return CogVideoXDDIMScheduler.from_config(scheduler)
        import json

        return CogVideoXDDIMScheduler.from_config(json.loads(open(scheduler).read()))

    # ---- hooks -------------------------------------------------------------------------------
    def _adapter_hook(self, l):
        def hook(mod, args, out):
            if not self.adapters_on:
                return out
            video, text = out
            p = self.params[l]
            o = F.linear(F.gelu(F.linear(video, p["dw"], p["db"])), p["uw"], p["ub"])
            if self.collect:
                self.outs.append(o)
            return video + o, text
        return hook

    def _capture(self, store):
        def hook(mod, args, out):
            if self.capture_qk:
                store.append(out)
        return hook

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the model -----------------------------------------------------------------------------
    def velocity(self, x, ctx, t, *, adapters: bool, collect: bool = False, capture_qk: bool = False):
        """The transformer's output on (B, F, C, H, W) latents; t a number or a (B,) tensor."""
        self.adapters_on, self.collect, self.capture_qk = adapters, collect, capture_qk
        try:
            t = torch.as_tensor(t)
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            return self.model(x, ctx, t, image_rotary_emb=self.rope, return_dict=False)[0]
        finally:
            self.adapters_on = self.collect = self.capture_qk = False

    # ---- (a) sampling x_t ------------------------------------------------------------------------
    def sample_xt(self, noise, ctx, uncond, j: int):
        """j DDIM steps with CFG from `noise`, the current erased model (adapters on), as CogVideoXPipeline's
        loop does them; returns (x_t, t) with t the timestep x_t sits at."""
        if self.scheduler is None:
            raise ValueError("sample_xt needs a scheduler")
        sched = self.scheduler
        sched.set_timesteps(self.num_sampler_steps)
        ts = sched.timesteps
        x, ctx = _as_tensor(noise), _as_tensor(ctx)
        b = x.shape[0]
        cond = torch.cat([_as_tensor(uncond).expand_as(ctx), ctx])
        with torch.no_grad():
            for i in range(int(j)):
                t = ts[i]
                out = self.velocity(torch.cat([x, x]), cond, t.expand(2 * b), adapters=True).float()
                out_u, out_c = out.chunk(2)
                out = out_u + self.guidance_scale * (out_c - out_u)
                x = sched.step(out, t, x, return_dict=False)[0].to(x.dtype)
        if j < len(ts):
            t_now = int(ts[j])
        else:  # where the last step lands: its "previous timestep", or the clean sample
            t_now = max(int(ts[-1]) - sched.config.num_train_timesteps // self.num_sampler_steps, 0)
        return x, t_now

    # ---- (b) the frozen passes -------------------------------------------------------------------
    def frozen_passes(self, x_t, t, batch) -> dict:
        """With the erasers off, no gradient: v_neg from the batched [uncond; cond] pass, the binary
        localization masks (L, B, N_video) from the conditional half's q/k (None when alpha_loc = 0), and
        the frozen velocity on the preservation sample (None when beta_pre = 0)."""
        x_t, ctx = _as_tensor(x_t), _as_tensor(batch["ctx"])
        b, text_len = x_t.shape[0], ctx.shape[1]
        uncond = _as_tensor(batch["uncond"]).expand_as(ctx)
        eta = _as_tensor(batch["eta"]).float().reshape(b, *([1] * (x_t.ndim - 1)))
        use_loc = self.alpha != 0
        self.qs.clear()
        self.ks.clear()
        with torch.no_grad():
            v = self.velocity(torch.cat([x_t, x_t]), torch.cat([uncond, ctx]), t, adapters=False, capture_qk=use_loc)
            v_u, v_c = v[:b].float(), v[b:].float()
            v_neg = v_u - eta * (v_c - v_u)
            masks = None
            if use_loc:
                masks = torch.stack([self._mask(q[b:], k[b:], text_len, batch) for q, k in zip(self.qs, self.ks)])
            self.qs.clear()
            self.ks.clear()
            v_pre = None
            if self.beta != 0:
                v_pre = self.velocity(_as_tensor(batch["x_pre"]), _as_tensor(batch["pre_ctx"]), t, adapters=False)
        return {"v_neg": v_neg, "masks": masks, "v_pre": v_pre}

    def _mask(self, q, k, text_len, batch):
        """§4: per-head softmax(q k^T / sqrt(d)) over all keys, mean over heads, video-query x concept-key
        mass summed over the concept's tokens, min-max normalised per token frame, thresholded."""
        b = q.shape[0]
        q = q.view(b, -1, self.heads, self.head_dim).transpose(1, 2).float()
        k = k.view(b, -1, self.heads, self.head_dim).transpose(1, 2).float()
        A = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1).mean(1)  # (B, S, S)
        A = A[:, text_len:, :text_len]
        idx, valid = np.asarray(batch["concept_idx"]), np.asarray(batch["concept_valid"], bool)
        m = torch.stack([A[i][:, torch.from_numpy(idx[i][valid[i]]).long()].sum(-1) for i in range(b)])
        m = m.view(b, *self.grid)
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        return ((m - lo) / (hi - lo + 1e-6) >= self.tau).float().view(b, -1)

    # ---- (c) the trained pass --------------------------------------------------------------------
    def loss_and_grads(self, x_t, t, batch, frozen: dict) -> dict:
        """Erased forward on [x_t; x_pre] (adapter outputs collected), the loss terms, backward.
        Leaves the (unclipped) gradients in the adapter tensors' .grad; returns the terms as floats."""
        x_t, ctx = _as_tensor(x_t), _as_tensor(batch["ctx"])
        b = x_t.shape[0]
        use_pre = self.beta != 0
        if use_pre:
            x_in = torch.cat([x_t, _as_tensor(batch["x_pre"])])
            c_in = torch.cat([ctx, _as_tensor(batch["pre_ctx"])])
        else:
            x_in, c_in = x_t, ctx
        self.optimizer.zero_grad(set_to_none=True)
        self.outs.clear()
        v = self.velocity(x_in, c_in, t, adapters=True, collect=self.alpha != 0).float()
        outs, self.outs = self.outs, []
        l_un = ((v[:b] - frozen["v_neg"]) ** 2).mean()
        l_loc = torch.zeros(())
        if self.alpha != 0:
            for o, m in zip(outs, frozen["masks"]):
                bg = 1 - m
                e = (o[:b].float() ** 2).mean(-1)
                l_loc = l_loc + ((bg * e).sum(-1) / (bg.sum(-1) + 1e-9)).mean()
            l_loc = l_loc / len(outs)
        l_pre = torch.zeros(())
        if use_pre:
            w = _as_tensor(batch["pre_valid"]).float().reshape(b, *([1] * (v.ndim - 1)))
            diff = (v[b:] - frozen["v_pre"]) ** 2 * w
            l_pre = diff.sum() / torch.clamp(w.sum() * diff[0].numel(), min=1.0)
        loss = l_un + self.alpha * l_loc + self.beta * l_pre
        loss.backward()
        return {"loss": loss.item(), "loss_unlearn": l_un.item(), "loss_loc": l_loc.item(),
                "loss_pre": l_pre.item()}

    def grads(self) -> dict:
        return adapter_arrays(self.params, grad=True)

    def adam_step(self) -> float:
        """Global-norm clipping (when grad_clip > 0) and one Adam step on the adapters; returns the
        gradient norm before clipping."""
        if self.grad_clip and self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.flat_params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.flat_params]))
        self.optimizer.step()
        return float(norm)

    # ---- the whole iteration ---------------------------------------------------------------------
    def iteration(self, batch, noise=None) -> dict:
        """(a) + (b) + (c): sample x_t from `noise` (or take batch["x_t"], batch["t"] when noise is None),
        frozen passes, loss, backward and Adam step; returns the loss terms and grad_norm."""
        if noise is not None:
            x_t, t = self.sample_xt(noise, batch["ctx"], batch["uncond"], int(batch["j"]))
        else:
            x_t, t = batch["x_t"], batch["t"]
        frozen = self.frozen_passes(x_t, t, batch)
        terms = self.loss_and_grads(x_t, t, batch, frozen)
        terms["grad_norm"] = self.adam_step()
        return terms


__all__ = ["ReferenceIteration", "adapter_arrays", "adapter_tensors", "pipeline_rope", "token_grid"]
