"""The erasure config: every field of a run, with its default and what it means.

Config files in configs/ start from `default_config()` and set what differs.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = "runs/erase"  # checkpoints, metrics.jsonl, resolved config, plots, exports
    c.seed = 0

    c.model = ConfigDict()
    c.model.path = config_dict.placeholder(str)  # pipeline folder: transformer/, text_encoder/, tokenizer/, scheduler/
    c.model.dtype = "bfloat16"  # compute dtype of the frozen model ("float32" for exact runs)
    c.model.param_dtype = "bfloat16"  # storage dtype of the frozen base weights
    c.model.attention = "auto"  # xla | cudnn | auto | reference | chunked (query blocks; bounded memory anywhere)
    c.model.attention_chunk = 1024  # query block of attention="chunked"
    c.model.remat = "none"  # none | full | dots | dots_no_batch | attn_out
    c.model.text_dtype = config_dict.placeholder(str)  # T5 dtype (None: the checkpoint's)

    c.video = ConfigDict()
    c.video.num_frames = 49  # pixel frames (latent frames = (n - 1) // temporal_compression + 1)
    c.video.height = 480
    c.video.width = 720

    # Concepts to erase: each {phrase, type, eta (None: erase.eta), preserve: [...], prompts: [...]}.
    c.concepts = [{"phrase": "naked body", "type": "nudity", "preserve": ["person"]}]

    c.prompts = ConfigDict()
    c.prompts.file = config_dict.placeholder(str)  # JSONL from `unlearn-jax prompts augment` (§3)
    c.prompts.augment = "none"  # none | offline (templates, no LLM) | file
    c.prompts.num_augmented = 50  # offline prompts per concept
    c.prompts.cache_dir = config_dict.placeholder(str)  # embedding cache (None: <workdir>/embedding_cache)
    c.prompts.max_concept_tokens = 16  # concept-token columns kept for the localization mask
    c.prompts.token_fallback = "all"  # phrase absent from an augmented prompt: all | none (§4)

    c.sampler = ConfigDict()
    c.sampler.num_steps = 50  # J: DDIM steps of the x_t sampler
    c.sampler.guidance_scale = 3.0  # g_s of the x_t sampler
    # two-stage models (Wan 2.2 A14B): g_s of the steps below the expert boundary (None: guidance_scale)
    c.sampler.guidance_scale_2 = config_dict.placeholder(float)
    # the x_t sampler: the pipeline's scheduler config run as this kind (ddim | dpm | flow_euler | ...);
    # None: the model family's (CogVideoX: ddim), written into the run's config.json
    c.sampler.kind = config_dict.placeholder(str)
    c.sampler.timestep_mode = "sampler"  # sampler: t = the timestep x_t sits at | esd_legacy
    c.sampler.xt_source = "current"  # current (erased model samples x_t) | frozen_bank
    c.sampler.bank_size = 8  # frozen_bank: trajectories per prompt pool

    c.erase = ConfigDict()
    c.erase.eta = 7.0  # negative guidance strength η
    c.erase.alpha_loc = 1.0  # α: localization loss weight
    c.erase.beta_pre = 1.0  # β: preservation loss weight
    c.erase.mask_threshold = 0.1  # τ
    c.erase.mask_mode = "per_layer"  # per_layer | average
    c.erase.mask_key_chunk = 1024  # key chunk of the mask's softmax normaliser

    c.eraser = ConfigDict()
    c.eraser.kind = "adapter"  # adapter | lora | attn | full
    c.eraser.rank = 128
    c.eraser.scale = 1.0

    c.train = ConfigDict()
    c.train.num_steps = 500
    c.train.batch_size = 1
    c.train.learning_rate = 1e-4
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0  # global-norm clip (<= 0: off)
    c.train.log_every = 1
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2

    # Adversarial erasure (AdvUnlearn / Receler style; docs/METHOD.md §10): every `every` steps (0: off) an
    # inner soft attack (`steps` Adam steps of lr `learning_rate` on the step's prompt embeddings) finds the
    # conditioning that makes the erased model predict the concept again at the step's x_t, and the step
    # also trains the negative target on it (weight `weight`). Its cost shows in metrics.jsonl ("seconds" of
    # the steps with "adversarial": 1).
    c.robust = ConfigDict()
    c.robust.every = 0
    c.robust.method = "soft"  # the inner attack (soft only: a discrete search does not fit in the jitted step)
    c.robust.steps = 5
    c.robust.learning_rate = 0.05
    c.robust.weight = 1.0

    c.mesh = ConfigDict()
    # -1: the remaining devices. FSDP over all devices by default: the published runs use batch 1,
    # so the weights are split and the batch is replicated (set data > 1 for batch > 1).
    c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    c.mesh.rules = config_dict.placeholder(list)  # logical -> mesh axis pairs (None: parallel.DEFAULT_RULES)

    c.distributed = ConfigDict()
    c.distributed.enabled = False  # jax.distributed.initialize (multi-host: TPU pods, GPU clusters)
    c.distributed.coordinator_address = config_dict.placeholder(str)
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    c.distributed.cpu_collectives = "gloo"  # CPU-only multi-process runs

    # After a completed run: generate every toy-world concept with the base and the erased model
    # and write the before/after table (<workdir>/eval.json, eval.md). Toy-world pipelines only
    # (assets/toy_world); real models are evaluated with `unlearn-jax eval`.
    c.evaluate = ConfigDict()
    c.evaluate.toy_world = False
    c.evaluate.erased_concepts = []  # toy concept names of this run ("colour:red"): judged <= 10%
    c.evaluate.n = 64  # prompts (videos) per concept and synonym split (train / held-out); 16 is too coarse
    c.evaluate.num_steps = 25  # DDIM steps of the evaluation sampler
    c.evaluate.guidance_scale = 6.0
    c.evaluate.seed = 0

    # In-run check (toy-world pipelines; unlearn_jax/toy/run_check.py): every `every` steps (0: off) a small
    # fixed set of videos (`n` prompts per erased concept of evaluate.erased_concepts, `n_other` per other
    # concept, train synonyms, a seed of its own) is generated with the current erasers and judged against the
    # base model's. The run stops when `confirm` checks in a row find the erased concepts gone (rate + broken
    # <= erased_target) with the rest intact; when the rest is harmed (one concept down > drop_margin, all others pooled down >
    # pooled_margin, or their broken fraction up > broken_margin) or the erasure overshoots (more than
    # erased_broken_limit of the erased concept's own videos broken) it goes back to the last state that passed
    # and multiplies the learning rate by lr_decay; after max_reverts such reverts it stops there. The
    # decisions are in <workdir>/checks.jsonl and the run's summary / eval.json.
    c.check = ConfigDict()
    c.check.every = 0
    c.check.n = 32
    c.check.n_other = 8
    c.check.seed = 1009
    c.check.erased_target = 0.07
    c.check.erased_broken_limit = 0.2
    c.check.confirm = 2
    c.check.drop_margin = 0.25
    c.check.pooled_margin = 0.05
    c.check.broken_margin = 0.05
    c.check.max_reverts = 3
    c.check.lr_decay = 0.5

    c.export = ConfigDict()
    c.export.formats = ["erasers"]  # erasers | t2vunlearning | lora | diffusers (at the end of the run)
    return c
