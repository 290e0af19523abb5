"""Tiny HunyuanVideo pipeline folders (Llama + CLIP text encoders, transformer, VAE, flow Euler; random
weights, tokenizers trained here) and their diffusers twins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers_text import WORDS, _sentences

# The Llama-3 chat-template markers the pipeline's template uses, and the tokenizers' specials.
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
# A short template of the pipeline's form (system part, then the user's prompt in the template's markers).
TEMPLATE = ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the video in detail:<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
TEXT_LEN = 13       # max_sequence_length: text tokens the transformer sees (odd)
FRAMES, HEIGHT, WIDTH = 5, 32, 48  # 2 latent frames of 4 x 6 latents -> 2 x 2 x 3 tokens


def _bpe_tokenizer(specials, bos: str, eos: str, pad: str, add_eos: bool, vocab_size: int = 1000):
    """A byte-level BPE trained on sentences of the test words, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_sentences(list(WORDS) + ["system", "user", "Describe", "video", "detail:"]),
                            trainer=trainer)
    single = f"{bos} $A {eos}" if add_eos else f"{bos} $A"
    raw.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, raw.token_to_id(t)) for t in {bos, eos}])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
                                   padding_side="right")


def llama_tokenizer():
    """Llama-3-like: BOS first, no EOS added, the chat markers as special tokens."""
    return _bpe_tokenizer(LLAMA_SPECIALS, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", False)


def clip_tokenizer():
    """CLIP-like: start and end tokens added, padded with the end token."""
    return _bpe_tokenizer(CLIP_SPECIALS, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", True)


def crop_start(tokenizer, template: str = TEMPLATE) -> int:
    """The template's tokens before the prompt (what the pipeline crops)."""
    return len(tokenizer(template.split("{}")[0]).input_ids)


# HunyuanVideo's published scheduler (hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json:
# FlowMatchEulerDiscreteScheduler, shift 7).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
             "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


def tiny_text_encoders(tok, tok2, seed: int = 0):
    """A tiny LlamaModel (60 wide, 4 layers, 3 query heads over 1 KV head) and CLIPTextModel (36 wide, 77
    positions, quick_gelu, pooled at the first end token)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaModel

    from helpers_hunyuan_text import llama_config, randomize_

    torch.manual_seed(seed)
    llama = randomize_(LlamaModel(llama_config("gqa", vocab_size=len(tok))), seed).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=36, intermediate_size=44, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok2.bos_token_id,
        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id))
    return llama, randomize_(clip, seed + 1).eval()


def build_hunyuan_pipeline(folder, seed: int = 0, guidance_embeds: bool = True):
    """Writes a tiny HunyuanVideoPipeline folder (with `prompt_template.json` naming the tiny template, its
    crop and TEXT_LEN); returns (folder, the diffusers HunyuanVideoPipeline of the same parts, call kwargs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    import helpers_hunyuan
    import helpers_hunyuan_vae

    folder = Path(folder)
    tok, tok2 = llama_tokenizer(), clip_tokenizer()
    llama, clip = tiny_text_encoders(tok, tok2, seed)
    vae = helpers_hunyuan_vae.build_torch(seed=seed)
    cfg = helpers_hunyuan.tiny_config("distilled", text_embed_dim=llama.config.hidden_size,
                                      pooled_projection_dim=clip.config.hidden_size,
                                      in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
                                      guidance_embeds=guidance_embeds)
    tm = helpers_hunyuan.build_torch(cfg, seed=seed + 2)
    crop = crop_start(tok)
    tok.save_pretrained(folder / "tokenizer")
    tok2.save_pretrained(folder / "tokenizer_2")
    llama.save_pretrained(folder / "text_encoder")
    clip.save_pretrained(folder / "text_encoder_2")
    tm.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "prompt_template.json").write_text(json.dumps(
        {"template": TEMPLATE, "crop_start": crop, "max_sequence_length": TEXT_LEN}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "HunyuanVideoPipeline",
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder": ["transformers", "LlamaModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"], "text_encoder_2": ["transformers", "CLIPTextModel"],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    pipe = HunyuanVideoPipeline(tokenizer=tok, text_encoder=llama, tokenizer_2=tok2, text_encoder_2=clip,
                                transformer=tm, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt_template={"template": TEMPLATE, "crop_start": crop}, max_sequence_length=TEXT_LEN,
                height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    return folder, pipe, call


def pipeline_frames(pipe, call: dict, prompts, seeds, steps: int, guidance: float) -> np.ndarray:
    """What `HunyuanVideoPipeline(..., output_type="np")` returns, one call per video (its own generator each)."""
    import torch

    out = []
    for p, s in zip(prompts, seeds):
        with torch.no_grad():
            r = pipe(prompt=p, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(s), **call)
        out.append(r.frames[0])
    return np.stack(out)
