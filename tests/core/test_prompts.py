"""Prompt augmentation (LLM and offline), the prompts file, concept-token indices, the embedding
cache and the `prompts` CLI handlers. Tiny tokenizers and a tiny random LLM are built here."""
from __future__ import annotations

import argparse
import json
import sys
import types
import warnings

import numpy as np
import pytest

from unlearn_jax import prompts as P
from unlearn_jax import prompts_cli
from unlearn_jax.errors import UnlearnError

# --------------------------------------------------------------------------------------------
# Fixtures: a T5-style tokenizer and a tiny causal LM, built locally
# --------------------------------------------------------------------------------------------

_CORPUS_WORDS = (
    "a the scene of dancing in on with and at video camera light slow bright soft woman man city park "
    "beach forest night morning walking running sitting standing red blue green naked body bodies explicit "
    "The A Naked Body In Camera Scene Woman"
).split()


@pytest.fixture(scope="module")
def t5_tokenizer():
    """A T5 tokenizer (Unigram + Metaspace, <pad>=0 </s>=1 <unk>=2) trained on a small word list.

    The vocabulary is tiny, so most words split into several pieces.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [" ".join(_CORPUS_WORDS[i:i + 9]) for i in range(len(_CORPUS_WORDS))] * 4
    corpus.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ( ) , . ; ' \"")
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    cls = getattr(transformers, "T5TokenizerFast", transformers.T5Tokenizer)
    t5 = cls(vocab=vocab, extra_ids=0)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    return t5


_LLM_WORDS = "a the scene of an explicit naked body video woman man walks in park light camera slowly".split()
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def _tiny_llm_dir(path, chat_template: bool):
    import transformers
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + _LLM_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = _CHAT_TEMPLATE
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
                                   eos_token_id=3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm_chat_dir(tmp_path_factory):
    return _tiny_llm_dir(tmp_path_factory.mktemp("llm_chat"), chat_template=True)


@pytest.fixture(scope="module")
def llm_plain_dir(tmp_path_factory):
    return _tiny_llm_dir(tmp_path_factory.mktemp("llm_plain"), chat_template=False)


class Recorder:
    """Wraps a generate function and records every (messages, seed) it is asked."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, messages, *, seed):
        self.calls.append((messages, seed))
        return self.fn(messages, seed=seed)


# --------------------------------------------------------------------------------------------
# Concepts and LLM augmentation
# --------------------------------------------------------------------------------------------

def test_concept_validation():
    c = P.Concept("  naked   body ", "nudity", eta=7.0, preserve=["person"])
    assert c.phrase == "naked body" and c.preserve == ("person",)
    with pytest.raises(UnlearnError, match="unknown type"):
        P.Concept("cat", "animal")
    with pytest.raises(UnlearnError, match="non-empty"):
        P.Concept("  ")
    with pytest.raises(UnlearnError, match="eta"):
        P.Concept("cat", "object", eta=-1.0)


def test_messages_cogvideox_and_hunyuan():
    msgs = P.build_messages(P.llm_input_text(P.Concept("naked body", "nudity")))
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "team of bots" in msgs[0]["content"]
    assert msgs[-1]["content"] == ('Create an imaginative video descriptive caption or modify an earlier '
                                   'caption in ENGLISH for the user input: " an explicit scene of naked body "')
    assert P.llm_input_text(P.Concept("cat", "object")) == "cat"
    assert P.llm_input_text(P.Concept("violence", "i2p")) == "an explicit scene of violence"
    h = P.build_messages("a cat", "hunyuan")
    assert [m["role"] for m in h] == ["system", "user"] and "preserve all" in h[0]["content"].lower()
    with pytest.raises(UnlearnError):
        P.build_messages("a cat", "sora")
    assert P.render_plain(h).endswith("User: a cat\n\nAssistant:")


def test_clean_llm_output():
    assert P.clean_llm_output('  "A cat\n sleeps."  \nUser: more') == "A cat sleeps."
    assert P.clean_llm_output("   ") == ""


def test_llm_augmentation_end_to_end_nudity(llm_chat_dir):
    llm = P.TransformersLLM(llm_chat_dir, device="cpu")
    assert llm.has_chat_template and llm.max_new_tokens == 200
    seen_kwargs = []
    real_generate = llm.model.generate

    def spy(**kwargs):
        seen_kwargs.append(kwargs)
        return real_generate(**kwargs)

    llm.model.generate = spy
    rec = Recorder(llm)
    concept = P.Concept("naked body", "nudity")
    out = P.augment_with_llm(concept, rec, n=2, seed=3)
    # What the LLM was asked: the explicit-scene input inside the CogVideoX user turn, via the chat template.
    messages, _ = rec.calls[0]
    assert messages[-1]["content"].endswith('for the user input: " an explicit scene of naked body "')
    rendered = llm.render(messages)
    assert rendered.startswith("<s> system You are one member of a team of bots")
    assert rendered.endswith('" an explicit scene of naked body " </s> <s> assistant ')
    assert seen_kwargs[0]["do_sample"] is True and seen_kwargs[0]["max_new_tokens"] == 200
    assert all(r.source == "llm" and r.concept == "naked body" and r.type == "nudity" for r in out)
    assert all(isinstance(r.seed, int) for r in out)
    # Reproducible: same seed, same prompts.
    llm.model.generate = real_generate
    again = P.augment_with_llm(concept, llm, n=len(out), seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in out]


def test_llm_plain_concatenation_without_chat_template(llm_plain_dir):
    llm = P.TransformersLLM(llm_plain_dir, device="cpu", max_new_tokens=8)
    assert not llm.has_chat_template
    msgs = P.build_messages("a cat", "hunyuan")
    assert llm.render(msgs) == P.render_plain(msgs)
    text = llm(msgs, seed=0)
    assert isinstance(text, str)


def test_face_retry_limit_with_tiny_llm(llm_chat_dir):
    # The random tiny model cannot write a name that is not in its vocabulary: the retries run out.
    llm = Recorder(P.TransformersLLM(llm_chat_dir, device="cpu", max_new_tokens=6))
    face = P.Concept("Zyx Quorra", "face")
    with pytest.raises(UnlearnError, match="Zyx Quorra"):
        P.augment_with_llm(face, llm, n=1, max_retries=3, on_failure="error")
    assert len(llm.calls) == 3
    assert len({seed for _, seed in llm.calls}) == 3  # each retry samples anew
    assert llm.calls[0][0][-1]["content"].endswith('for the user input: " Zyx Quorra "')


def test_face_retry_until_name_appears():
    attempts = []

    def fake(messages, *, seed):
        attempts.append(seed)
        return "A person walks in the park." if len(attempts) % 3 else "angela merkel walks in the park."

    out = P.augment_with_llm(P.Concept("Angela Merkel", "face"), fake, n=2, max_retries=5)
    assert len(attempts) == 6 and len(out) == 2
    assert all("angela merkel" in r.prompt for r in out)


def test_face_retry_warns_and_drops():
    calls = {"n": 0}

    def fake(messages, *, seed):
        calls["n"] += 1
        return "a face" if calls["n"] > 1 else "Ada Lovelace at a desk"  # first prompt ok, second never

    with pytest.warns(RuntimeWarning, match="Ada Lovelace"):
        out = P.augment_with_llm(P.Concept("Ada Lovelace", "face"), fake, n=2, max_retries=2)
    assert len(out) == 1
    with pytest.raises(UnlearnError, match="no usable prompt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P.augment_with_llm(P.Concept("Ada Lovelace", "face"), lambda m, seed: "", n=2, max_retries=2)


# --------------------------------------------------------------------------------------------
# Offline augmentation and pools
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctype", P.CONCEPT_TYPES)
def test_offline_deterministic_and_contains_phrase(ctype):
    c = P.Concept("Naked Body" if ctype != "face" else "Angela Merkel", ctype)
    a = P.augment_offline(c, 40, seed=7)
    b = P.augment_offline(c, 40, seed=7)
    other = P.augment_offline(c, 40, seed=8)
    assert a == b and len(a) == 40
    assert [r.prompt for r in a] != [r.prompt for r in other]
    assert all(c.phrase in r.prompt and r.source == "offline" and r.type == ctype for r in a)
    assert len({r.prompt for r in a}) == 40  # varied
    assert min(len(r.prompt.split()) for r in a) >= 30  # long, like LLM-refined prompts


def test_build_prompt_records_pool():
    concepts = [P.Concept("naked body", "nudity", preserve=("person",), prompts=("a nude statue",)),
                P.Concept("cat", "object")]
    recs = P.build_prompt_records(concepts, n=5, seed=0, n_preserve=2)
    by = {(r.concept, r.source): [] for r in recs}
    for r in recs:
        by[(r.concept, r.source)].append(r.prompt)
    assert by[("naked body", "concept")] == ["naked body"]
    assert by[("naked body", "user")] == ["a nude statue"]
    assert len(by[("naked body", "offline")]) == 5 and len(by[("cat", "offline")]) == 5
    assert by[("naked body", "preserve")][0] == "person" and len(by[("naked body", "preserve")]) == 3
    assert all("person" in p for p in by[("naked body", "preserve")])
    assert ("cat", "preserve") not in by
    with pytest.raises(UnlearnError, match="twice"):
        P.build_prompt_records([P.Concept("cat"), P.Concept("cat")])


# --------------------------------------------------------------------------------------------
# Prompts file
# --------------------------------------------------------------------------------------------

def test_prompts_file_round_trip(tmp_path):
    recs = P.build_prompt_records([P.Concept("naked body", "nudity", preserve=("person",))], n=3)
    path = P.write_prompts(tmp_path / "p.jsonl", recs)
    assert P.read_prompts(path) == recs
    lines = path.read_text().splitlines()
    assert len(lines) == len(recs) and json.loads(lines[0]) == {
        "prompt": "naked body", "concept": "naked body", "type": "nudity", "source": "concept"}
    pools = P.prompt_pools(recs)
    assert pools["naked body"]["prompts"][0] == "naked body" and len(pools["naked body"]["prompts"]) == 4
    assert pools["naked body"]["preserve"] == ["person"]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "x", "concept": "c", "type": "object"}', "missing field"),
    ('{"prompt": "x", "concept": "c", "type": "animal", "source": "llm"}', "unknown type"),
    ('{"prompt": "x", "concept": "c", "type": "object", "source": "web"}', "unknown source"),
    ('{"prompt": "", "concept": "c", "type": "object", "source": "llm"}', "empty prompt"),
    ('{"prompt": 3, "concept": "c", "type": "object", "source": "llm"}', "must be a string"),
    ('{"prompt": "x", "concept": "c", "type": "object", "source": "llm", "seed": "1"}', "seed"),
    ('{"prompt": "x", "concept": "c", "type": "style", "source": "llm"}', "has type 'style' here"),
])
def test_prompts_file_validation(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    first = '{"prompt": "c", "concept": "c", "type": "object", "source": "concept"}'
    path.write_text(first + "\n\n" + line + "\n")
    with pytest.raises(UnlearnError, match=message) as e:
        P.read_prompts(path)
    assert f"{path}:3:" in str(e.value)


def test_prompts_file_missing_or_empty(tmp_path):
    with pytest.raises(UnlearnError, match="does not exist"):
        P.read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UnlearnError, match="no prompt"):
        P.read_prompts(tmp_path / "e.jsonl")


# --------------------------------------------------------------------------------------------
# Concept-token indices
# --------------------------------------------------------------------------------------------

def _groups(indices):
    groups, cur = [], []
    for i in indices:
        if cur and i != cur[-1] + 1:
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + ([cur] if cur else [])


def _ids(tok, prompt, max_length):
    return tok(prompt, padding="max_length", max_length=max_length, truncation=True,
               add_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("prompt, n_occurrences", [
    ("naked body", 1),                                        # the phrase alone, at the start
    ("a woman with a naked body in the park", 1),             # mid-sentence
    ("Naked Body at night, and a NAKED BODY in the morning", 2),  # casing, repeats
    ("the scene (naked body) and naked   body.", 2),          # no "▁" before "naked", odd spacing
    ("naked bodies dancing in the forest", 1),                # plural ending
])
def test_concept_token_indices_found(t5_tokenizer, prompt, n_occurrences):
    tok, L = t5_tokenizer, 64
    idx = P.concept_token_indices(tok, prompt, "naked body", L)
    ids = _ids(tok, prompt, L)
    groups = _groups(idx)
    assert len(groups) == n_occurrences
    for g in groups:
        assert len(g) > 2  # the phrase spans several SentencePiece pieces here
        text = tok.decode([ids[i] for i in g], skip_special_tokens=True)
        assert " ".join(text.split()).casefold() in ("naked body", "naked bodies")
    assert tok.eos_token_id not in [ids[i] for i in idx] and tok.pad_token_id not in [ids[i] for i in idx]


def test_concept_token_indices_word_boundaries(t5_tokenizer):
    assert P.find_phrase_spans("a bodybuilder and a body", "body") == [(20, 24)]
    assert P.find_phrase_spans("Cats and cat", "cat") == [(0, 4), (9, 12)]
    assert P.find_phrase_spans("a category", "cat") == []
    assert P.concept_token_indices(t5_tokenizer, "a bodybuilder", "body", 32, fallback="none") == []


def test_concept_token_indices_fallback_and_truncation(t5_tokenizer):
    tok, L = t5_tokenizer, 32
    prompt = "a woman walking in the park"
    ids = _ids(tok, prompt, L)
    n_text = ids.index(tok.eos_token_id)
    assert P.concept_token_indices(tok, prompt, "naked body", L) == list(range(n_text))  # EOS excluded
    assert P.concept_token_indices(tok, prompt, "naked body", L, fallback="none") == []
    with pytest.raises(UnlearnError):
        P.concept_token_indices(tok, prompt, "naked body", L, fallback="some")
    # An occurrence cut off by truncation does not count.
    long_prompt = "a woman walking in the park " * 10 + "naked body"
    assert P.concept_token_indices(tok, long_prompt, "naked body", L, fallback="none") == []
    assert len(P.concept_token_indices(tok, long_prompt, "naked body", L)) == L - 1


def test_concept_token_mask(t5_tokenizer):
    tok, L = t5_tokenizer, 48
    prompts = ["naked body", "a man in the city", "the naked body at night"]
    mask = P.concept_token_mask(tok, prompts, "naked body", L)
    assert mask.shape == (3, L) and mask.dtype == bool
    for row, p in enumerate(prompts):
        assert np.flatnonzero(mask[row]).tolist() == P.concept_token_indices(tok, p, "naked body", L)
    mask2 = P.concept_token_mask(tok, prompts, ["naked body", "city", "night"], L, fallback="none")
    assert mask2[1].any() and mask2[2].sum() < mask[2].sum() + 5
    with pytest.raises(ValueError):
        P.concept_token_mask(tok, prompts, ["a", "b"], L)


def test_align_offsets_fallback_for_tokenizers_without_offsets(t5_tokenizer):
    class NoOffsets:
        """A tokenizer that cannot return offsets (like a slow SentencePiece one)."""

        def __init__(self, tok):
            self.tok = tok
            self.all_special_ids = tok.all_special_ids

        def __call__(self, text, return_offsets_mapping=False, **kw):
            if return_offsets_mapping:
                raise NotImplementedError
            return self.tok(text, **kw)

        def convert_ids_to_tokens(self, ids):
            return self.tok.convert_ids_to_tokens(ids)

    prompt = "a woman, naked body at night; naked body"
    expected = P.concept_token_indices(t5_tokenizer, prompt, "naked body", 40)
    assert P.concept_token_indices(NoOffsets(t5_tokenizer), prompt, "naked body", 40) == expected


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------

class FakeEncoder:
    def __init__(self, length=4, dim=3, dtype=np.float32):
        self.calls = []
        self.length, self.dim, self.dtype = length, dim, dtype

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        out = np.stack([np.full((self.length, self.dim), float(len(p)) + k, dtype=np.float32)
                        for k, p in enumerate(prompts)])
        return out.astype(self.dtype)


def test_cache_hit_and_miss(tmp_path):
    cache = P.EmbeddingCache(tmp_path / "cache")
    enc = FakeEncoder()
    prompts = ["a cat", "a dog", "a cat", ""]
    first = cache.get_or_encode(prompts, "fp-1", enc)
    assert first.shape == (4, 4, 3) and enc.calls == [["a cat", "a dog", ""]]  # each prompt once
    np.testing.assert_array_equal(first[0], first[2])
    second = P.EmbeddingCache(tmp_path / "cache").get_or_encode(prompts, "fp-1", enc)
    assert len(enc.calls) == 1
    np.testing.assert_array_equal(first, second)
    # A new fingerprint (other weights, tokenizer or max length) never serves the old entries.
    for fp in ("fp-2", "fp-1|max_length=100"):
        cache.get_or_encode(["a cat"], fp, enc)
    assert len(enc.calls) == 3
    assert cache.hits == 0 and cache.misses == 6
    # Partial hit, chunked encoding, progress.
    done = []
    out = cache.get_or_encode(["a cat", "a bird", "a fish", "a dog"], "fp-1", enc, batch_size=1,
                              progress=done.append)
    assert enc.calls[-2:] == [["a bird"], ["a fish"]] and sum(done) == 4 and out.shape == (4, 4, 3)


def test_cache_bfloat16_round_trip(tmp_path):
    import ml_dtypes
    enc = FakeEncoder(dtype=ml_dtypes.bfloat16)
    cache = P.EmbeddingCache(tmp_path)
    a = cache.get_or_encode(["x", "yy"], "fp", enc)
    b = cache.get_or_encode(["x", "yy"], "fp", enc)
    assert len(enc.calls) == 1 and b.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))


def test_cache_crash_mid_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = P.EmbeddingCache(tmp_path)
    enc = FakeEncoder()
    real_atomic_file = P.atomic_file

    class Crash(Exception):
        pass

    import contextlib

    @contextlib.contextmanager
    def crashing_atomic_file(path, mode="wb"):
        with real_atomic_file(path, mode) as f:
            class HalfWriter:
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    raise Crash("power cut")

            yield HalfWriter()

    monkeypatch.setattr(P, "atomic_file", crashing_atomic_file)
    with pytest.raises(Crash):
        cache.get_or_encode(["a cat"], "fp", enc)
    monkeypatch.setattr(P, "atomic_file", real_atomic_file)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no entry, no temp file
    cache.get_or_encode(["a cat"], "fp", enc)
    assert len(enc.calls) == 2
    cache.get_or_encode(["a cat"], "fp", enc)
    assert len(enc.calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key", "flip_value"])
def test_cache_corrupted_entry_is_reencoded(tmp_path, damage):
    cache = P.EmbeddingCache(tmp_path)
    enc = FakeEncoder()
    good = cache.get_or_encode(["a cat"], "fp", enc)
    entry = cache.path(cache.key("fp", "a cat"))
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 100)
    elif damage == "other_key":  # an entry of another prompt copied over this one
        cache.get_or_encode(["a dog"], "fp", enc)
        entry.write_bytes(cache.path(cache.key("fp", "a dog")).read_bytes())
    else:  # a well-formed file whose values do not match its checksum
        import io
        with np.load(entry) as z:
            fields = {k: z[k] for k in z.files}
        fields["embedding"] = fields["embedding"] + 1
        buf = io.BytesIO()
        np.savez(buf, **fields)
        entry.write_bytes(buf.getvalue())
    n_calls = len(enc.calls)
    with pytest.warns(RuntimeWarning, match="invalid"):
        again = cache.get_or_encode(["a cat"], "fp", enc)
    assert len(enc.calls) == n_calls + 1
    np.testing.assert_array_equal(again, good)
    cache.get_or_encode(["a cat"], "fp", enc)  # repaired: a hit again
    assert len(enc.calls) == n_calls + 1


def test_cache_rejects_bad_encoder_output(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        P.EmbeddingCache(tmp_path).get_or_encode(["a", "b"], "fp", lambda ps: np.zeros((1, 2, 3)))


# --------------------------------------------------------------------------------------------
# CLI handlers
# --------------------------------------------------------------------------------------------

def _parse(argv):
    parser = argparse.ArgumentParser(prog="unlearn-jax")
    prompts_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_augment_offline(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    args = _parse(["prompts", "augment", "--concept", "naked body", "--type", "nudity", "--concept", "cat",
                   "--type", "object", "--n", "4", "--offline", "--seed", "1", "--preserve", "person",
                   "--out", str(out)])
    assert args.func(args) == 0
    recs = P.read_prompts(out)
    assert len(recs) == 2 * (1 + 4 + 1)
    assert {(r.concept, r.type) for r in recs} == {("naked body", "nudity"), ("cat", "object")}
    assert "wrote 12 prompts" in capsys.readouterr().out
    first = out.read_bytes()
    assert args.func(args) == 0 and out.read_bytes() == first  # deterministic


def test_cli_augment_mistakes(tmp_path):
    args = _parse(["prompts", "augment", "--concept", "a", "--concept", "b", "--type", "object",
                   "--type", "face", "--type", "style", "--offline", "--out", str(tmp_path / "p.jsonl")])
    with pytest.raises(UnlearnError, match="--type"):
        args.func(args)
    args = _parse(["prompts", "augment", "--concept", "a", "--llm", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "p.jsonl")])
    with pytest.raises(UnlearnError, match="does not exist"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parse(["prompts", "augment", "--concept", "a", "--out", "x"])  # neither --llm nor --offline
    args = _parse(["prompts"])
    assert args.func(args) == 2


def test_cli_augment_llm(tmp_path, llm_chat_dir):
    out = tmp_path / "p.jsonl"
    args = _parse(["prompts", "augment", "--concept", "naked body", "--type", "nudity", "--n", "2",
                   "--llm", str(llm_chat_dir), "--device", "cpu", "--max-new-tokens", "6",
                   "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty random answer may be retried
        assert args.func(args) == 0
    recs = P.read_prompts(out)
    assert recs[0].source == "concept" and all(r.source == "llm" for r in recs[1:])


def test_cli_encode_with_stub_encoder(tmp_path, monkeypatch, capsys):
    model = tmp_path / "pipeline"
    model.mkdir()
    records = P.build_prompt_records([P.Concept("cat", "object")], n=3)
    prompts_file = P.write_prompts(tmp_path / "p.jsonl", records)
    enc = FakeEncoder(length=8)
    stub = types.ModuleType("unlearn_jax.text_encoding")
    stub.encoder_fingerprint = lambda model_dir, max_length=None, *, dtype=None: f"{model_dir}:{max_length}:{dtype}"

    def encode_prompts(model_dir, prompts, *, max_length=None, dtype=None, mesh=None, batch_size=8):
        assert batch_size == 2 and dtype in (None, "bfloat16")
        return enc(prompts)

    stub.encode_prompts = encode_prompts
    monkeypatch.setitem(sys.modules, "unlearn_jax.text_encoding", stub)
    argv = ["prompts", "encode", "--prompts", str(prompts_file), "--model", str(model),
            "--cache", str(tmp_path / "cache"), "--batch-size", "2"]
    args = _parse(argv)
    assert args.func(args) == 0
    assert sum(len(c) for c in enc.calls) == 5  # 4 prompts + the empty prompt
    assert "5 encoded" in capsys.readouterr().out
    assert args.func(args) == 0 and len(enc.calls) == 3  # all cached now
    assert "5 from the cache" in capsys.readouterr().out
    args = _parse(argv + ["--max-length", "100"])
    assert args.func(args) == 0 and sum(len(c) for c in enc.calls) == 10  # new fingerprint
    args = _parse(argv + ["--dtype", "bfloat16"])
    assert args.func(args) == 0 and sum(len(c) for c in enc.calls) == 15  # new fingerprint
    args = _parse(["prompts", "encode", "--prompts", str(prompts_file), "--model", str(tmp_path / "none"),
                   "--cache", str(tmp_path / "cache")])
    with pytest.raises(UnlearnError, match="does not exist"):
        args.func(args)
