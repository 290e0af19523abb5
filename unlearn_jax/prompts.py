"""Concept prompts: augmentation (local LLM or offline templates), the prompts file, concept-token
indices in the T5 token sequence, and an on-disk cache of prompt embeddings.

The path of the data: concepts --augment--> prompts file (JSONL) --encode--> cache.

* Augmentation (docs/METHOD.md §3). A short concept such as "naked body" is turned into
  long, detailed video captions, because the diffusion model is used with such captions and an
  erasure learned on the short phrase alone does not carry over. With an LLM the instruction is
  the CogVideoX-style "prompt extension" (or a shorter HunyuanVideo-style rewrite); without one,
  templates and paraphrase lists produce varied long prompts that all contain the phrase.
* Concept tokens (docs/METHOD.md §4). The localization mask sums attention over the text
  tokens of the concept phrase; `concept_token_indices` finds them on character offsets, so
  SentencePiece splitting, casing and repeats do not matter.
* Embedding cache. One entry per (encoder fingerprint, prompt), written atomically and verified
  on every read, so a crash or a changed encoder never yields a wrong embedding.

Nothing here imports JAX, torch or transformers at import time; the LLM path imports
transformers and torch when it is used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import UnlearnError

__all__ = [
    "CONCEPT_TYPES",
    "SOURCES",
    "Concept",
    "PromptRecord",
    "COGVIDEOX_SYSTEM_PROMPT",
    "COGVIDEOX_FEW_SHOT",
    "HUNYUAN_SYSTEM_PROMPT",
    "cogvideox_user_turn",
    "llm_input_text",
    "build_messages",
    "render_plain",
    "clean_llm_output",
    "TransformersLLM",
    "augment_with_llm",
    "augment_offline",
    "build_prompt_records",
    "write_prompts",
    "read_prompts",
    "prompt_pools",
    "find_phrase_spans",
    "concept_token_indices",
    "concept_token_mask",
    "EmbeddingCache",
]

# --------------------------------------------------------------------------------------------
# Concepts and prompt records
# --------------------------------------------------------------------------------------------

CONCEPT_TYPES = ("nudity", "i2p", "face", "object", "style", "generic")
# "concept": the phrase itself; "llm"/"offline": augmented prompts; "user": prompts given by the
# user for the concept (Concept.prompts); "preserve": prompts of what must stay unchanged.
SOURCES = ("concept", "llm", "offline", "user", "preserve")
STYLES = ("cogvideox", "hunyuan")


@dataclasses.dataclass(frozen=True)
class Concept:
    """One concept to erase.

    phrase:   the concept as it is written in prompts ("naked body", "Angela Merkel", "cat").
    type:     one of CONCEPT_TYPES; it picks the augmentation input text and rules.
    eta:      this concept's negative-guidance scale, None for the config's default.
    prompts:  extra prompts of the concept given by the user (kept as they are).
    preserve: preservation phrases/prompts of related but allowed content ("person").
    """

    phrase: str
    type: str = "generic"
    eta: float | None = None
    prompts: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise UnlearnError("a concept needs a non-empty phrase")
        object.__setattr__(self, "phrase", " ".join(self.phrase.split()))
        if self.type not in CONCEPT_TYPES:
            raise UnlearnError(
                f"concept {self.phrase!r}: unknown type {self.type!r}; use one of {', '.join(CONCEPT_TYPES)}"
            )
        if self.eta is not None and not (isinstance(self.eta, (int, float)) and self.eta > 0):
            raise UnlearnError(f"concept {self.phrase!r}: eta must be a positive number, got {self.eta!r}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "preserve", tuple(self.preserve))


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One line of a prompts file."""

    prompt: str
    concept: str
    type: str
    source: str
    seed: int | None = None

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "concept": self.concept, "type": self.type, "source": self.source}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def _derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any JSON-able parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# LLM augmentation
# --------------------------------------------------------------------------------------------

COGVIDEOX_SYSTEM_PROMPT = (
    "You are one member of a team of bots that makes videos. Your teammate is a video-generation "
    "bot that renders exactly what you write, so the video can only be as good as your "
    "description. People send you short video ideas; your job is to turn each idea into a single "
    "rich, vivid and extremely detailed description of a video. Describe the main subject and its "
    "appearance, what happens over the course of the shot, the setting and background, the "
    "colours, the lighting and the atmosphere, and how the camera moves. "
    "Rules: write exactly one video description per request and nothing else: no title, no list, "
    "no explanation, no quotation marks. Keep every element of the idea, including every name. "
    "When the user asks you to change an earlier description, rewrite the whole description with "
    "the change woven in instead of only adding words at the end; when the user asks for something "
    "new, disregard the earlier conversation. Make each description about as long as the example "
    "answers (roughly 80 to 120 words); anything longer is cut off."
)

# Three worked examples: (short idea, the description expected for it).
COGVIDEOX_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "a boy flying a kite on a hill",
        "A young boy in a yellow raincoat and muddy rubber boots runs up a grassy hill, a red "
        "diamond-shaped kite tugging at the string in his small hands. The wind ripples through "
        "the tall grass and lifts the kite higher as its long ribbon tail snaps back and forth "
        "against a sky of drifting white clouds. The camera follows him from a low angle, then "
        "tilts up to the kite as it climbs. Late-afternoon sunlight rims his hair with gold, and "
        "the valley below fades into a soft blue haze, giving the scene a carefree, nostalgic mood.",
    ),
    (
        "an old fisherman repairing a net",
        "An elderly fisherman with a weathered face, a white stubbled beard and a faded navy "
        "sweater sits on an overturned wooden crate at the end of a pier, mending a tangled green "
        "fishing net spread across his knees. His knotted fingers pull a wooden shuttle through "
        "the torn mesh with slow, practiced movements. Gulls circle overhead and small boats rock "
        "gently in the harbour behind him. The camera begins on a close-up of his hands and "
        "slowly pulls back to reveal the misty grey morning, the wet planks and the calm sea.",
    ),
    (
        "a red sports car on a mountain road, cinematic",
        "A glossy red sports car speeds along a narrow road carved into the side of a mountain, "
        "its engine roaring as it leans into a tight hairpin bend. Sunlight flashes across the "
        "curved bodywork and chrome wheels, while loose gravel sprays from the tyres. Snow-capped "
        "peaks rise behind the road and a deep green valley drops away below the low stone wall. "
        "A drone camera tracks the car from above, then swoops down to race alongside it at road "
        "level. The warm golden light of sunset and the long shadows give the shot a dramatic, "
        "cinematic feel.",
    ),
)

HUNYUAN_SYSTEM_PROMPT = (
    "Rewrite the video description that the user sends into a clearer and more detailed version "
    "for a video-generation model. Preserve all of its information: every subject, name, action, "
    "attribute and place must stay, and nothing may be removed, softened or contradicted. You may "
    "add details about the camera, the lighting and the atmosphere. Answer in English with the "
    "rewritten description only, as one paragraph."
)

_COGVIDEOX_USER_TEMPLATE = (
    'Create an imaginative video descriptive caption or modify an earlier caption in ENGLISH for '
    'the user input: " {text} "'
)


def cogvideox_user_turn(text: str) -> str:
    """The user turn of the CogVideoX prompt-extension dialogue for `text`."""
    return _COGVIDEOX_USER_TEMPLATE.format(text=text)


def llm_input_text(concept: Concept) -> str:
    """What the LLM is asked to expand: "an explicit scene of <phrase>" for nudity/i2p, else the phrase."""
    if concept.type in ("nudity", "i2p"):
        return "an explicit scene of " + concept.phrase
    return concept.phrase


def build_messages(text: str, style: str = "cogvideox") -> list[dict]:
    """Chat messages (system, few-shot turns, user) that ask for one long caption of `text`."""
    if style == "cogvideox":
        messages = [{"role": "system", "content": COGVIDEOX_SYSTEM_PROMPT}]
        for idea, answer in COGVIDEOX_FEW_SHOT:
            messages.append({"role": "user", "content": cogvideox_user_turn(idea)})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": cogvideox_user_turn(text)})
        return messages
    if style == "hunyuan":
        return [
            {"role": "system", "content": HUNYUAN_SYSTEM_PROMPT},
            {"role": "user", "content": text},
        ]
    raise UnlearnError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")


_PLAIN_ROLES = {"system": None, "user": "User", "assistant": "Assistant"}


def render_plain(messages: Sequence[Mapping[str, str]]) -> str:
    """A plain-text rendering of `messages` for LLMs without a chat template.

    The system text comes first, then "User: ..." / "Assistant: ..." lines, ending with an
    open "Assistant:" for the model to complete.
    """
    parts = []
    for m in messages:
        label = _PLAIN_ROLES.get(m["role"], m["role"].capitalize())
        parts.append(m["content"] if label is None else f"{label}: {m['content']}")
    return "\n\n".join(parts) + "\n\nAssistant:"


_STOP_MARKERS = ("\nUser:", "\nuser:", "\nAssistant:", "\nSystem:")


def clean_llm_output(text: str) -> str:
    """One caption from raw LLM output: cut at a new dialogue turn, drop quotes, join lines."""
    for marker in _STOP_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    text = text.strip("\"“” ")
    return text


class TransformersLLM:
    """A local instruction-tuned causal LM (a transformers model folder) as a caption generator.

    Called as `llm(messages, seed=...) -> str`. The chat template of the tokenizer is used when it
    has one, otherwise `render_plain`. Sampling: do_sample=True, `max_new_tokens` (200) new tokens,
    the torch RNG seeded per call (in a forked RNG state, so the caller's RNG is untouched).
    """

    def __init__(self, path: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 200, **generate_kwargs):
        path = Path(path)
        if not path.is_dir():
            raise UnlearnError(f"LLM folder {str(path)!r} does not exist; "
                               "pass a local transformers model folder")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise UnlearnError(f"LLM augmentation needs torch and transformers ({e}); "
                               "or use --offline") from e
        self._torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model_kwargs = {"local_files_only": True}
            if dtype is not None:
                model_kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the folder holds, the user's fix is the same
            import pickle

            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if isinstance(e, pickle.UnpicklingError):
                first = ("its weights would unpickle Python objects, which torch.load(weights_only=True) refuses; "
                         "use a safetensors copy of the model")
            raise UnlearnError(f"cannot load an LLM from {str(path)!r}: {first}") from None
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)
        self.model.eval()
        self.max_new_tokens = int(max_new_tokens)
        self.generate_kwargs = generate_kwargs
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The exact text given to the model for `messages`."""
        if not self.has_chat_template:
            return render_plain(messages)
        messages = [dict(m) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates that reject a system turn
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                merged = [{"role": messages[1]["role"],
                           "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.tokenizer.apply_chat_template(merged + messages[2:], tokenize=False,
                                                          add_generation_prompt=True)
            raise

    def __call__(self, messages: Sequence[Mapping[str, str]], *, seed: int) -> str:
        torch = self._torch
        text = self.render(messages)
        # A chat template already carries its own BOS etc.; the plain rendering takes the defaults.
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.has_chat_template)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(int(seed))
            out = self.model.generate(**enc, do_sample=True, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad_id, **self.generate_kwargs)
        new_tokens = out[0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)


GenerateFn = Callable[..., str]  # generate(messages, *, seed=int) -> raw text


def augment_with_llm(concept: Concept, generate: GenerateFn, n: int = 50, *, seed: int = 0,
                     style: str = "cogvideox", max_retries: int = 10, on_failure: str = "warn",
                     progress: Callable[[int], None] | None = None) -> list[PromptRecord]:
    """`n` LLM-written prompts for `concept` (records with source "llm").

    `generate(messages, seed=...)` returns the raw model text (`TransformersLLM` or a stand-in).
    Every call gets its own seed derived from (`seed`, phrase, prompt number, attempt), so a run
    is reproducible. An empty answer is asked again; for a `face` concept an answer that does not
    name the person (case-insensitive) is asked again too. After `max_retries` attempts for one
    prompt: on_failure="warn" warns and drops that prompt, "error" raises UnlearnError. If no
    prompt at all could be made, UnlearnError is raised either way.
    """
    if n < 0:
        raise UnlearnError(f"the number of prompts must be >= 0, got {n}")
    if max_retries < 1:
        raise UnlearnError(f"max_retries must be >= 1, got {max_retries}")
    if on_failure not in ("warn", "error"):
        raise ValueError(f"on_failure must be 'warn' or 'error', got {on_failure!r}")
    messages = build_messages(llm_input_text(concept), style)
    name = concept.phrase.casefold()
    records: list[PromptRecord] = []
    failed = 0
    for i in range(n):
        got = None
        for attempt in range(max_retries):
            call_seed = _derive_seed("llm", seed, concept.phrase, i, attempt)
            text = clean_llm_output(generate(messages, seed=call_seed))
            if not text:
                continue
            if concept.type == "face" and name not in " ".join(text.split()).casefold():
                continue
            got = PromptRecord(text, concept.phrase, concept.type, "llm", call_seed)
            break
        if got is None:
            why = (f"none names {concept.phrase!r}" if concept.type == "face" else "all were empty")
            msg = (f"LLM prompt {i + 1}/{n} for concept {concept.phrase!r}: {max_retries} answers, {why}")
            if on_failure == "error":
                raise UnlearnError(msg + "; try another LLM or more retries")
            warnings.warn(msg + "; prompt dropped", RuntimeWarning, stacklevel=2)
            failed += 1
        else:
            records.append(got)
        if progress is not None:
            progress(1)
    if n > 0 and not records:
        raise UnlearnError(f"the LLM produced no usable prompt for concept {concept.phrase!r} "
                           f"({failed} failed after {max_retries} attempts each)")
    return records


# --------------------------------------------------------------------------------------------
# Offline augmentation: templates and paraphrase lists
# --------------------------------------------------------------------------------------------

# How the subject is introduced; "{p}" is the concept phrase, kept verbatim.
_SUBJECT = {
    "person": (
        "{p}", "{p}, seen up close,", "{p}, in a relaxed mood,", "{p}, with a calm expression,",
        "{p}, looking thoughtful,", "{p}, smiling faintly,",
    ),
    "explicit": (
        "an explicit scene of {p}", "{p}", "a candid scene of {p}", "an intimate view of {p}",
        "an uncensored shot of {p}", "a revealing scene of {p}",
    ),
    "object": (
        "{p}", "a single {p}", "a detailed {p}", "an ordinary {p}", "{p}, shown in full,",
        "a striking {p}",
    ),
    "style": (
        "a scene painted in the style of {p}", "a video in the style of {p}",
        "an animated landscape in the manner of {p}", "a moving artwork in the style of {p}",
        "a dreamlike sequence rendered like a work by {p}", "a city street reimagined in the style of {p}",
    ),
    "generic": (
        "{p}", "a scene of {p}", "a detailed view of {p}", "a video showing {p}", "a shot featuring {p}",
        "a vivid depiction of {p}",
    ),
}
_SUBJECT_KIND = {"face": "person", "nudity": "explicit", "i2p": "explicit", "object": "object",
                 "style": "style", "generic": "generic"}

_OPENING = (
    "The video opens on {s} {a} {w}.",
    "{W}, the camera finds {s} {a}.",
    "A slow shot reveals {s} {a} {w}.",
    "We see {s} {a} {w}.",
    "This clip shows {s} {a} {w}.",
    "At the start of the clip, we see {s} {a} {w}.",
)
_ACTION = {
    "person": ("walking slowly", "standing still", "turning toward the camera", "sitting quietly",
               "gesturing while talking", "laughing softly", "looking into the distance",
               "stepping forward"),
    "explicit": ("lying on a bed", "standing by a window", "moving slowly", "stretching",
                 "sitting on the edge of a bath", "turning around", "reclining on a sofa",
                 "stepping out of the water"),
    "object": ("resting on a table", "rotating slowly", "standing in the foreground", "placed on the ground",
               "catching the light", "shown from several angles", "sitting alone", "drifting into view"),
    "style": ("unfolding gradually", "shifting in gentle motion", "coming to life", "swirling slowly",
              "changing with the light", "moving in soft waves", "flowing across the frame",
              "blooming into colour"),
    "generic": ("filling the frame", "in clear view", "moving gently", "at the centre of the shot",
                "shown in detail", "coming into focus", "slowly appearing", "set against the background"),
}
_WHERE = (
    "in a quiet city park", "on a sunlit beach", "in a dim bedroom", "on a busy street at night",
    "in an empty studio", "in a misty forest clearing", "in a modern apartment", "on a rooftop above the city",
    "inside a small wooden cabin", "in an old stone courtyard", "in a field of tall grass",
    "in a hotel room with white curtains", "by a rainy harbour", "along a desert road",
    "beside a mountain lake", "in a crowded market",
)
_CAMERA = (
    "The camera pans slowly from left to right, keeping the subject centred.",
    "A handheld camera follows closely, with slight natural shake.",
    "The camera starts wide and pushes in to a close-up.",
    "A drone shot circles overhead before descending to eye level.",
    "The camera tracks alongside in a smooth dolly movement.",
    "A static camera holds the frame while the action unfolds.",
    "The camera tilts up gradually, revealing more of the surroundings.",
    "A low-angle shot emphasizes scale and presence.",
)
_LIGHT = (
    "Warm golden-hour sunlight casts long soft shadows.",
    "Cool blue moonlight mixes with the glow of street lamps.",
    "Soft diffuse daylight pours in through a large window.",
    "Dramatic side lighting carves out strong contrasts.",
    "Flickering candlelight gives everything an amber tone.",
    "Bright overcast light keeps the colours even and muted.",
    "Neon signs paint the scene in pink and teal reflections.",
    "Morning haze scatters pale light across the frame.",
)
_MOOD = (
    "The atmosphere is calm and intimate.",
    "The mood is tense and mysterious.",
    "The feeling is warm, nostalgic and unhurried.",
    "The atmosphere is lively and full of energy.",
    "A quiet, dreamlike stillness hangs over everything.",
    "The mood is melancholic and reflective.",
    "The scene feels spontaneous and natural.",
    "The atmosphere is cinematic and grand.",
)
_DETAIL = (
    "Fine details such as texture, fabric and skin are rendered sharply.",
    "Dust particles float in the air, catching the light.",
    "A gentle breeze moves the leaves and curtains in the background.",
    "Reflections shimmer on the wet ground nearby.",
    "The background is softly blurred with a shallow depth of field.",
    "People pass by in the distance, slightly out of focus.",
    "Colours are rich and saturated, with deep shadows.",
    "The image has a fine film grain and a slight vignette.",
)
_CLOSING = {
    "person": ("The shot ends on a lingering close-up of {p}.", "In the final moments the focus stays on {p}.",
               "The clip closes with {p} still at the centre of the frame.", "", ""),
    "explicit": ("The shot ends on a lingering close-up of the {p}.",
                 "In the final moments the focus stays on the {p}.",
                 "The clip closes with the {p} still at the centre of the frame.", "", ""),
    "object": ("The shot ends on a lingering close-up of the {p}.",
               "In the final moments the focus stays on the {p}.",
               "The clip closes with the {p} still at the centre of the frame.", "", ""),
    "style": ("Every frame keeps the unmistakable look of {p}.",
              "Brushwork, palette and composition all recall {p}.",
              "The whole clip reads as a living work by {p}.", ""),
    "generic": ("In the final moments, {p} remains the focus of the frame.",
                "The clip closes with {p} still at the centre of the frame.", "", ""),
}
_QUALITY = (
    "Shot in high definition, realistic style.", "Cinematic 4K footage.", "Photorealistic, highly detailed.",
    "Smooth motion, natural colours.", "",
)


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:] if sentence else sentence


def _offline_prompt(phrase: str, kind: str, rng: random.Random) -> str:
    subject = rng.choice(_SUBJECT[kind]).format(p=phrase)
    where = rng.choice(_WHERE)
    opening = rng.choice(_OPENING).format(s=subject, a=rng.choice(_ACTION[kind]), w=where,
                                          W=_capitalize(where))
    if not opening.startswith(phrase):  # never change the phrase's own casing
        opening = _capitalize(opening)
    middle = [rng.choice(_CAMERA), rng.choice(_LIGHT), rng.choice(_MOOD), rng.choice(_DETAIL)]
    rng.shuffle(middle)
    closing = rng.choice(_CLOSING[kind]).format(p=phrase)
    parts = [opening, *middle[: rng.randint(3, 4)], closing, rng.choice(_QUALITY)]
    return " ".join(p for p in parts if p)


def augment_offline(concept: Concept, n: int = 50, *, seed: int = 0) -> list[PromptRecord]:
    """`n` long template prompts for `concept` (source "offline"), deterministic given `seed`.

    Every prompt contains the concept phrase verbatim; prompts within a concept are distinct
    whenever the template space allows it.
    """
    if n < 0:
        raise UnlearnError(f"the number of prompts must be >= 0, got {n}")
    kind = _SUBJECT_KIND[concept.type]
    seen: set[str] = set()
    records = []
    for i in range(n):
        for attempt in range(20):
            prompt_seed = _derive_seed("offline", seed, concept.phrase, i, attempt)
            text = _offline_prompt(concept.phrase, kind, random.Random(prompt_seed))
            if text not in seen:
                break
        seen.add(text)
        records.append(PromptRecord(text, concept.phrase, concept.type, "offline", prompt_seed))
    return records


def build_prompt_records(concepts: Sequence[Concept], *, n: int = 50, seed: int = 0,
                         generate: GenerateFn | None = None, style: str = "cogvideox",
                         n_preserve: int = 0, max_retries: int = 10, on_failure: str = "warn",
                         progress: Callable[[int], None] | None = None) -> list[PromptRecord]:
    """The prompt pools of `concepts`, as prompt-file records.

    Per concept: the phrase itself ("concept"), its user prompts ("user"), `n` augmented prompts
    ("llm" with `generate`, else "offline"), and its preservation phrases ("preserve"), each
    preservation phrase followed by `n_preserve` augmented prompts of it (offline, or by the LLM
    as a generic concept).
    """
    if not concepts:
        raise UnlearnError("no concept given")
    phrases = [c.phrase for c in concepts]
    dup = sorted({p for p in phrases if phrases.count(p) > 1})
    if dup:
        raise UnlearnError(f"concept given twice: {', '.join(map(repr, dup))}")
    if style not in STYLES:
        raise UnlearnError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")

    def augment(c: Concept, count: int) -> list[PromptRecord]:
        if generate is None:
            return augment_offline(c, count, seed=seed)
        return augment_with_llm(c, generate, count, seed=seed, style=style, max_retries=max_retries,
                                on_failure=on_failure, progress=progress)

    records: list[PromptRecord] = []
    for c in concepts:
        records.append(PromptRecord(c.phrase, c.phrase, c.type, "concept"))
        records.extend(PromptRecord(p, c.phrase, c.type, "user") for p in c.prompts if p.strip())
        records.extend(augment(c, n))
        for p in c.preserve:
            p = " ".join(p.split())
            if not p:
                continue
            records.append(PromptRecord(p, c.phrase, c.type, "preserve"))
            if n_preserve:
                extra = augment(Concept(p, "generic"), n_preserve)
                records.extend(dataclasses.replace(r, concept=c.phrase, type=c.type, source="preserve")
                               for r in extra)
    return records


# --------------------------------------------------------------------------------------------
# The prompts file (JSONL)
# --------------------------------------------------------------------------------------------

_REQUIRED = ("prompt", "concept", "type", "source")


def write_prompts(path: str | os.PathLike, records: Iterable[PromptRecord]) -> Path:
    """Writes `records` to `path` as JSONL (one object per line), atomically."""
    path = Path(path)
    lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
    with atomic_file(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def _parse_record(obj: Any, where: str) -> PromptRecord:
    if not isinstance(obj, dict):
        raise UnlearnError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise UnlearnError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in _REQUIRED:
        if not isinstance(obj[k], str):
            raise UnlearnError(f"{where}: field {k!r} must be a string")
    if not obj["prompt"].strip():
        raise UnlearnError(f"{where}: empty prompt")
    if not obj["concept"].strip():
        raise UnlearnError(f"{where}: empty concept")
    if obj["type"] not in CONCEPT_TYPES:
        raise UnlearnError(f"{where}: unknown type {obj['type']!r}; use one of {', '.join(CONCEPT_TYPES)}")
    if obj["source"] not in SOURCES:
        raise UnlearnError(f"{where}: unknown source {obj['source']!r}; use one of {', '.join(SOURCES)}")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UnlearnError(f"{where}: field 'seed' must be an integer")
    return PromptRecord(obj["prompt"], obj["concept"], obj["type"], obj["source"], seed)


def read_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    """Reads and validates a prompts file; errors name the file and line. Blank lines are skipped.

    Each concept must keep one type throughout the file. Extra fields are ignored.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnlearnError(f"prompts file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UnlearnError(f"cannot read prompts file {str(path)!r}: {e}") from None
    records = []
    types: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UnlearnError(f"{where}: invalid JSON ({e.msg})") from None
        rec = _parse_record(obj, where)
        if types.setdefault(rec.concept, rec.type) != rec.type:
            raise UnlearnError(f"{where}: concept {rec.concept!r} has type {rec.type!r} here but "
                               f"{types[rec.concept]!r} on an earlier line")
        records.append(rec)
    if not records:
        raise UnlearnError(f"prompts file {str(path)!r} holds no prompt")
    return records


def prompt_pools(records: Sequence[PromptRecord]) -> dict[str, dict[str, Any]]:
    """Groups records by concept: {phrase: {"type", "prompts", "preserve"}}, in file order.

    "prompts" always starts with the concept phrase itself (added if the file lacks it) and holds
    every non-preserve prompt once; "preserve" holds the preservation prompts once each.
    """
    pools: dict[str, dict[str, Any]] = {}
    for r in records:
        pool = pools.setdefault(r.concept, {"type": r.type, "prompts": [r.concept], "preserve": []})
        key = "preserve" if r.source == "preserve" else "prompts"
        if r.prompt not in pool[key]:
            pool[key].append(r.prompt)
    return pools


# --------------------------------------------------------------------------------------------
# Concept-token indices
# --------------------------------------------------------------------------------------------

def find_phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of `phrase` in `text`.

    Case-insensitive; any run of whitespace in either matches any other; an occurrence must
    start and end on word boundaries, except that a plural ending ("s", "es", "y" -> "ies") is
    allowed and kept in the span: "cat" matches "Cats" but not "category", "body" matches
    "bodies". Occurrences do not overlap and come left to right.
    """
    words = phrase.split()
    if not words:
        return []
    *head, last = words
    if re.match(r"\w", last[-1]):
        forms = re.escape(last) + r"(?:e?s)?"
        if len(last) > 1 and last[-1] in "yY":
            forms = f"(?:{forms}|{re.escape(last[:-1])}ies)"
        last_re = forms + r"(?!\w)"
    else:
        last_re = re.escape(last)
    pattern = r"(?<!\w)" + r"\s+".join([*(re.escape(w) for w in head), last_re])
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _tokenize_for_indices(tokenizer, prompt: str, max_length: int):
    """(input_ids, offsets, content mask) of `prompt` tokenized as the CogVideoX pipeline does.

    `offsets[i]` is the (start, end) character span of token i, `content[i]` is True for tokens
    of the prompt text (not padding, not EOS or other special tokens).
    """
    kwargs = dict(padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_special_tokens_mask=True, return_attention_mask=True)
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, **kwargs)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        enc = tokenizer(prompt, **kwargs)
        offsets = _align_offsets(tokenizer, prompt, enc["input_ids"])
    ids = list(enc["input_ids"])
    special = enc.get("special_tokens_mask")
    attn = enc.get("attention_mask")
    specials = set(getattr(tokenizer, "all_special_ids", ()) or ())
    content = []
    for i, tid in enumerate(ids):
        is_special = bool(special[i]) if special is not None else tid in specials
        is_pad = attn is not None and not attn[i]
        content.append(not is_special and not is_pad)
    return ids, offsets, content


def _align_offsets(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Best-effort character spans for tokenizers that cannot return offsets (slow SentencePiece).

    Walks the text with the token pieces ("▁" = a space); a piece that cannot be found (unknown
    token, normalised characters) gets an empty span at the cursor.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    lowered = text.casefold()
    cursor = 0
    spans = []
    for piece in pieces:
        core = (piece or "").replace("▁", "").replace("Ġ", "").casefold()
        while cursor < len(text) and text[cursor].isspace():
            cursor += 1
        if core and lowered.startswith(core, cursor):
            spans.append((cursor, cursor + len(core)))
            cursor += len(core)
        else:
            spans.append((cursor, cursor))
    return spans


def _select(offsets, content, spans) -> list[int]:
    chosen = []
    n = len(offsets)
    for i in range(n):
        if not content[i]:
            continue
        s, e = offsets[i]
        for ms, me in spans:
            if e > s and s < me and e > ms:
                chosen.append(i)
                break
            if e == s and ms <= s < me:  # zero-width piece (a lone "▁") inside an occurrence
                chosen.append(i)
                break
    # A lone "▁" piece right before a chosen token of the same word belongs to the occurrence.
    extra = [i for i in range(n - 1)
             if content[i] and i not in chosen and (i + 1) in chosen and offsets[i][1] <= offsets[i + 1][0]
             and offsets[i][0] == offsets[i][1]]
    return sorted(set(chosen) | set(extra))


def concept_token_indices(tokenizer, prompt: str, phrase: str, max_length: int = 226,
                          fallback: str = "all") -> list[int]:
    """Positions of the concept phrase's tokens in `prompt`, tokenized as the CogVideoX pipeline
    does (padding to `max_length`, truncation, add_special_tokens=True).

    All occurrences count (see `find_phrase_spans` for the matching rule: case-insensitive, word
    boundaries, plural endings); a token is the phrase's if its character span overlaps an
    occurrence, so a phrase split into several SentencePiece pieces, or tokenized differently at
    the start of the prompt, is found whole. Occurrences cut off by truncation do not count.

    When no occurrence survives: fallback="all" returns every prompt-text token (not padding and
    not EOS: the EOS token carries no part of the prompt's wording), fallback="none" returns [].
    """
    if fallback not in ("all", "none"):
        raise UnlearnError(f"unknown concept-token fallback {fallback!r}; use 'all' or 'none'")
    _, offsets, content = _tokenize_for_indices(tokenizer, prompt, max_length)
    chosen = _select(offsets, content, find_phrase_spans(prompt, phrase))
    if chosen or fallback == "none":
        return chosen
    return [i for i, c in enumerate(content) if c]


def concept_token_mask(tokenizer, prompts: Sequence[str], phrases: str | Sequence[str],
                       max_length: int = 226, fallback: str = "all") -> np.ndarray:
    """Boolean mask (N, max_length): row i marks the concept tokens of prompts[i].

    `phrases` is one phrase for all prompts or one per prompt.
    """
    if isinstance(phrases, str):
        phrases = [phrases] * len(prompts)
    if len(phrases) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(phrases)} phrases")
    mask = np.zeros((len(prompts), max_length), dtype=bool)
    for row, (prompt, phrase) in enumerate(zip(prompts, phrases)):
        idx = concept_token_indices(tokenizer, prompt, phrase, max_length, fallback)
        mask[row, idx] = True
    return mask


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------

_ENTRY_FORMAT = "unlearn-jax-embedding-v1"


def _to_storable(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """(array numpy can save losslessly, dtype name) - bfloat16 & co. are stored as raw bits."""
    name = arr.dtype.name
    if arr.dtype.kind == "V" or name in ("bfloat16",) or name.startswith("float8"):
        return arr.view(np.dtype(f"u{arr.dtype.itemsize}")), name
    return arr, name


def _from_stored(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.name == name:
        return arr
    import ml_dtypes

    return arr.view(np.dtype(getattr(ml_dtypes, name)))


def _leaves(entry) -> dict[str, np.ndarray]:
    """A conditioning entry (an array, or a flat dict of named arrays) as {name: array}; "" names a bare array."""
    if isinstance(entry, Mapping):
        if not entry or not all(isinstance(k, str) and k for k in entry):
            raise ValueError("a conditioning dict needs non-empty string keys")
        return {k: np.ascontiguousarray(np.asarray(v)) for k, v in entry.items()}
    return {"": np.ascontiguousarray(np.asarray(entry))}


def _signature(entry) -> tuple:
    return tuple((k, v.shape, v.dtype.name) for k, v in sorted(_leaves(entry).items()))


class EmbeddingCache:
    """Prompt conditioning on disk, one verified entry per (encoder fingerprint, prompt).

    An entry is `<root>/<key[:2]>/<key>.npz`, key = sha256 of (fingerprint, prompt). It holds the
    conditioning of one prompt, the key, the prompt and a sha256 of every array's bytes: for a
    family whose conditioning is one embeddings array, that array (L, D) and its dtype name; for a
    conditioning of several named arrays (embeddings, masks, pooled vectors), each of them. It is
    written to a temporary file and renamed into place, and on every read the key, the
    checksums, the shape (2-D for a bare embedding) and the dtypes are checked: an entry that fails
    is treated as missing (a warning is given) and written again. The fingerprint must change
    whenever the encoder weights, the tokenizer or the max length change; the cache then simply misses.

    `hits` and `misses` count prompts served from / written to the cache by this object.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UnlearnError(f"embedding cache {str(self.root)!r} is a file, not a folder")
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, prompt: str) -> str:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError("the encoder fingerprint must be a non-empty string")
        blob = json.dumps([_ENTRY_FORMAT, fingerprint, prompt], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str):
        """The verified conditioning of entry `key` (an array, or a dict of arrays), or None if absent or invalid."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stored_key = str(z["key"])
                if "leaves" in z.files:  # a conditioning of named arrays
                    names = [str(n) for n in z["leaves"]]
                    raws = {n: (np.array(z[f"leaf:{n}"]), str(z[f"dtype:{n}"]), str(z[f"sha256:{n}"])) for n in names}
                else:
                    raw = np.array(z["embedding"])
                    if raw.ndim != 2:
                        raise ValueError(f"embedding has shape {raw.shape}, expected 2 dimensions")
                    raws = {"": (raw, str(z["dtype"]), str(z["sha256"]))}
            if stored_key != key:
                raise ValueError("key mismatch")
            out = {}
            for name, (raw, dtype_name, checksum) in raws.items():
                if hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest() != checksum:
                    raise ValueError("checksum mismatch")
                out[name] = _from_stored(raw, dtype_name)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss
            warnings.warn(f"embedding cache entry {path} is invalid ({e}); it will be re-encoded",
                          RuntimeWarning, stacklevel=3)
            return None
        return out[""] if list(out) == [""] else out

    def store(self, key: str, prompt: str, embedding) -> None:
        """Writes one entry atomically (temporary file, then rename)."""
        leaves = _leaves(embedding)
        buf = io.BytesIO()
        if list(leaves) == [""]:
            emb = leaves[""]
            if emb.ndim != 2:
                raise ValueError(f"an embedding must be (L, D), got shape {emb.shape}")
            raw, dtype_name = _to_storable(emb)
            np.savez(buf, embedding=raw, dtype=np.array(dtype_name), key=np.array(key), prompt=np.array(prompt),
                     sha256=np.array(hashlib.sha256(raw.tobytes()).hexdigest()))
        else:
            arrays = {"leaves": np.array(list(leaves)), "key": np.array(key), "prompt": np.array(prompt)}
            for name, arr in leaves.items():
                raw, dtype_name = _to_storable(arr)
                arrays.update({f"leaf:{name}": raw, f"dtype:{name}": np.array(dtype_name),
                               f"sha256:{name}": np.array(hashlib.sha256(raw.tobytes()).hexdigest())})
            np.savez(buf, **arrays)
        with atomic_file(self.path(key), "wb") as f:
            f.write(buf.getvalue())

    def get_or_encode(self, prompts: Sequence[str], fingerprint: str,
                      encode_fn: Callable[[list[str]], Any], *, batch_size: int | None = None,
                      progress: Callable[[int], None] | None = None):
        """Conditioning of `prompts`, from the cache where present, else from `encode_fn`: an array
        (N, L, D), or a dict of arrays with a leading N when `encode_fn` returns such a dict.

        `encode_fn(list_of_prompts)` returns an array (M, L, D) (or a dict of arrays (M, ...)); it is
        called only for prompts missing from the cache (each distinct prompt once), in chunks of
        `batch_size` (all at once if None), and each chunk is stored as soon as it is encoded.
        `progress(k)` is called as k prompts are done (served or encoded).
        """
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        found: dict[str, Any] = {}
        keys = {p: self.key(fingerprint, p) for p in dict.fromkeys(prompts)}
        for p, k in keys.items():
            emb = self.load(k)
            if emb is not None:
                found[p] = emb
        if found and len({_signature(e) for e in found.values()}) > 1:
            found = {}  # inconsistent entries under one fingerprint: trust none of them
        n_cached = sum(1 for p in prompts if p in found)
        self.hits += n_cached
        if progress is not None and n_cached:
            progress(n_cached)
        missing = [p for p in keys if p not in found]
        step = batch_size or max(len(missing), 1)
        for start in range(0, len(missing), step):
            chunk = missing[start:start + step]
            out = encode_fn(list(chunk))
            leaves = _leaves(out)
            bad = [n for n, a in leaves.items() if a.ndim < 1 or a.shape[0] != len(chunk)]
            if "" in leaves and leaves[""].ndim != 3:
                bad = [""]
            if bad:
                raise ValueError(f"encode_fn returned shape {leaves[bad[0]].shape} for {len(chunk)} prompts; "
                                 "expected (prompts, length, dim)")
            for i, p in enumerate(chunk):
                emb = leaves[""][i] if "" in leaves else {n: a[i] for n, a in leaves.items()}
                self.store(keys[p], p, emb)
                found[p] = emb
            chunk_set = set(chunk)
            n_done = sum(1 for p in prompts if p in chunk_set)
            self.misses += n_done
            if progress is not None:
                progress(n_done)
        if not prompts:
            return np.zeros((0, 0, 0), dtype=np.float32)
        shapes = {_signature(found[p]) for p in keys}
        if len(shapes) > 1:
            raise UnlearnError(f"embeddings under fingerprint {fingerprint[:12]}... differ in shape/dtype "
                               f"{sorted(map(str, shapes))}; the fingerprint does not cover the encoder "
                               f"settings, or clear the cache folder {str(self.root)!r}")
        first = found[prompts[0]]
        if isinstance(first, Mapping):
            return {n: np.stack([found[p][n] for p in prompts]) for n in first}
        return np.stack([found[p] for p in prompts])
