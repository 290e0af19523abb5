"""The `unlearn-jax prompts` subcommand: `augment` (write a prompts file) and `encode` (fill the
embedding cache from a prompts file).

    unlearn-jax prompts augment --concept "naked body" --type nudity --n 50 --offline --out prompts.jsonl
    unlearn-jax prompts augment --concept "Angela Merkel" --type face --llm /models/qwen --out faces.jsonl
    unlearn-jax prompts encode --prompts prompts.jsonl --model /models/CogVideoX-2b --cache cache/

`register(subparsers)` adds the subcommand to the main parser; each handler takes the parsed
arguments and returns an exit code. User mistakes raise UnlearnError (one-line message).
"""
from __future__ import annotations

import argparse
import sys

from unlearn_jax.errors import UnlearnError

_TYPES = ("nudity", "i2p", "face", "object", "style", "generic")  # = prompts.CONCEPT_TYPES


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `prompts` (with `augment` and `encode`) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "prompts", help="augment concept prompts and encode them",
        description="Write a concept prompts file (augment) and encode it into the embedding cache (encode).")
    parser.set_defaults(func=lambda args: _no_action(parser))
    sub = parser.add_subparsers(dest="prompts_command", metavar="{augment,encode}")

    aug = sub.add_parser(
        "augment", help="write a prompts file (JSONL) for one or more concepts",
        description="Extend each concept into a pool of long prompts, with a local LLM or offline templates, "
                    "and write them as JSONL (prompt, concept, type, source, seed).")
    aug.add_argument("--concept", action="append", required=True, metavar="PHRASE",
                     help="concept phrase to erase; repeat for several concepts")
    aug.add_argument("--type", action="append", choices=_TYPES, metavar="TYPE",
                     help=f"concept type ({', '.join(_TYPES)}); once for all concepts or once per "
                          "--concept, in order (default generic)")
    aug.add_argument("--preserve", action="append", default=[], metavar="PHRASE",
                     help="preservation phrase kept for every concept; repeatable")
    aug.add_argument("--n", type=int, default=50, help="augmented prompts per concept (default 50)")
    aug.add_argument("--n-preserve", type=int, default=0,
                     help="augmented prompts per preservation phrase (default 0: the phrase only)")
    src = aug.add_mutually_exclusive_group(required=True)
    src.add_argument("--llm", metavar="PATH", help="local instruction-tuned causal LM folder (transformers)")
    src.add_argument("--offline", action="store_true", help="use built-in templates, no LLM")
    aug.add_argument("--style", choices=("cogvideox", "hunyuan"), default="cogvideox",
                     help="LLM instruction: CogVideoX prompt extension or HunyuanVideo rewrite")
    aug.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    aug.add_argument("--max-retries", type=int, default=10,
                     help="LLM attempts per prompt (face prompts must name the person)")
    aug.add_argument("--strict", action="store_true",
                     help="fail instead of dropping a prompt whose retries ran out")
    aug.add_argument("--max-new-tokens", type=int, default=200, help="LLM tokens per answer (default 200)")
    aug.add_argument("--device", default="auto", help="LLM device: auto, cpu, cuda, cuda:1 ...")
    aug.add_argument("--llm-dtype", default=None, help="LLM dtype: auto, float32, bfloat16, float16")
    aug.add_argument("--out", required=True, metavar="FILE", help="prompts file to write (JSONL)")
    aug.set_defaults(func=cmd_augment)

    enc = sub.add_parser(
        "encode", help="encode a prompts file into the embedding cache",
        description="Encode every prompt of a prompts file (and the empty prompt) with the pipeline's T5 "
                    "text encoder; embeddings already in the cache for this encoder are not recomputed.")
    enc.add_argument("--prompts", required=True, metavar="FILE", help="prompts file (JSONL)")
    enc.add_argument("--model", required=True, metavar="PIPELINE_DIR",
                     help="diffusers pipeline folder (with text_encoder/ and tokenizer/)")
    enc.add_argument("--cache", required=True, metavar="DIR", help="embedding cache folder")
    enc.add_argument("--max-length", type=int, default=None,
                     help="text length in tokens (default: the pipeline transformer's max_text_seq_length, "
                          "226 for CogVideoX)")
    enc.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call (default 8)")
    enc.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="encoder compute dtype (default float32); embeddings are stored as float32")
    enc.add_argument("--no-empty", action="store_true",
                     help="do not encode the empty (unconditional) prompt")
    enc.set_defaults(func=cmd_encode)
    return parser


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _concepts_from_args(args):
    from unlearn_jax.prompts import Concept

    phrases = args.concept
    types = args.type or ["generic"]
    if len(types) == 1:
        types = types * len(phrases)
    if len(types) != len(phrases):
        raise UnlearnError(f"--type given {len(types)} times for {len(phrases)} --concept; "
                           "give it once for all or once per concept")
    return [Concept(p, t, preserve=tuple(args.preserve)) for p, t in zip(phrases, types)]


def cmd_augment(args: argparse.Namespace) -> int:
    """`prompts augment`: writes the prompts file; returns 0."""
    from unlearn_jax.prompts import build_prompt_records, write_prompts

    if args.n < 0 or args.n_preserve < 0:
        raise UnlearnError("--n and --n-preserve must be >= 0")
    if args.max_retries < 1:
        raise UnlearnError("--max-retries must be >= 1")
    concepts = _concepts_from_args(args)
    generate = None
    bar = None
    if args.llm:
        from tqdm import tqdm

        from unlearn_jax.prompts import TransformersLLM

        generate = TransformersLLM(args.llm, device=args.device, dtype=args.llm_dtype,
                                   max_new_tokens=args.max_new_tokens)
        n_preserve = sum(len(c.preserve) for c in concepts) * args.n_preserve
        bar = tqdm(total=args.n * len(concepts) + n_preserve, desc="LLM prompts", unit="prompt",
                   file=sys.stderr)
    try:
        records = build_prompt_records(
            concepts, n=args.n, seed=args.seed, generate=generate, style=args.style,
            n_preserve=args.n_preserve, max_retries=args.max_retries,
            on_failure="error" if args.strict else "warn", progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    path = write_prompts(args.out, records)
    print(f"wrote {len(records)} prompts for {len(concepts)} concept(s) to {path}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """`prompts encode`: fills the embedding cache with every prompt of the file; returns 0."""
    from pathlib import Path

    from tqdm import tqdm

    from unlearn_jax.prompts import EmbeddingCache, read_prompts

    if (args.max_length is not None and args.max_length < 1) or args.batch_size < 1:
        raise UnlearnError("--max-length and --batch-size must be >= 1")
    if not Path(args.model).is_dir():
        raise UnlearnError(f"model folder {args.model!r} does not exist")
    records = read_prompts(args.prompts)
    prompts = list(dict.fromkeys(r.prompt for r in records))
    if not args.no_empty and "" not in prompts:
        prompts.append("")

    from unlearn_jax.text_encoding import encode_prompts, encoder_fingerprint

    # The fingerprint covers the encoder weights, tokenizer, resolved max length and compute dtype.
    fingerprint = encoder_fingerprint(args.model, args.max_length, dtype=args.dtype)

    def encode_fn(batch):
        return encode_prompts(args.model, batch, max_length=args.max_length, dtype=args.dtype,
                              batch_size=args.batch_size)

    cache = EmbeddingCache(args.cache)
    with tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", file=sys.stderr) as bar:
        embeddings = cache.get_or_encode(prompts, fingerprint, encode_fn, batch_size=args.batch_size,
                                         progress=bar.update)
    print(f"{len(prompts)} prompts: {cache.hits} from the cache, {cache.misses} encoded; "
          f"embeddings {tuple(embeddings.shape[1:])} {embeddings.dtype} in {args.cache}")
    return 0
