"""The contract between a family's transformer and the erasers / localization masks.

Every family's model offers

    model.forward(latents, cond, timestep, hooks=None, extras=None) -> (velocity, aux)

where `cond` is the family's conditioning pytree (see `families.base`), `hooks` a `Hooks`
and `extras` a pytree with a leading layer axis: the hooks of layer `l` see `extras[l]`.
The model calls the hooks only in its *eraser stack* (the block stack its family's
`EraserSite` names) and returns what they return stacked over those layers:
`aux = {"concept": ..., "attn": ...}`, each None where its hook is absent.

The hooks are layout-neutral: whether the text comes first in a joint sequence (CogVideoX),
after the video (HunyuanVideo) or only as the keys of a cross-attention (Wan), the model
hands the concept hook a `ConceptAttention` that says where the text keys are, so one
`objectives.concept_attention_map` serves every family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class ConceptAttention:
    """The attention of one block whose softmax over the text keys gives the localization mask.

    video_queries: (B, N_video, heads, head_dim) the queries of the video tokens.
    keys: (B, S, heads, head_dim) every key those queries attend to.
    text_start: position of the first text token among `keys` (static).
    text_len: number of text tokens among `keys` (static); the concept's token positions are
        counted from `text_start`.
    key_mask: (B, S) bool, the keys the softmax runs over, or None for all of them.
    Both arrays are taken where the family's method specification says (CogVideoX: before the
    QK LayerNorm and RoPE).
    """

    video_queries: Any
    keys: Any
    text_start: int
    text_len: int
    key_mask: Any = None

    def select(self, rows: slice) -> "ConceptAttention":
        """The same view for a slice of the batch."""
        mask = None if self.key_mask is None else self.key_mask[rows]
        return dataclasses.replace(self, video_queries=self.video_queries[rows], keys=self.keys[rows], key_mask=mask)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Per-block extension points (all optional, all pure functions).

    edit_layer(layer_state, extra, attention) -> layer_state: replaces weights of this block before
        it runs (LoRA deltas, fine-tuned copies). `attention` is the in-block path of the attention
        module the erasers act on (e.g. "attn1"), so a hook finds its projections in any family.
    on_concept_attention(view: ConceptAttention, extra) -> aux: sees the block's concept attention.
    on_video_attn(a, extra) -> (a', aux): acts on the video tokens' attention output where the
        family's adapter sits (CogVideoX: after to_out, before the gated residual).
    """

    edit_layer: Callable | None = None
    on_concept_attention: Callable | None = None
    on_video_attn: Callable | None = None

    def concept(self, view: ConceptAttention, extra):
        return None if self.on_concept_attention is None else self.on_concept_attention(view, extra)

    def video_attn(self, a, extra):
        if self.on_video_attn is None:
            return a, None
        return self.on_video_attn(a, extra)

    def layer(self, layer_state, extra, attention: str):
        return layer_state if self.edit_layer is None else self.edit_layer(layer_state, extra, attention)


NO_HOOKS = Hooks()
