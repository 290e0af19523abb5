"""Erasure that can be seen: a short run on the bundled toy-world model removes red and keeps green.

The full-size run (configs/toy_world/erase_red.py, 150 steps, every concept evaluated) and its
ablations are in the README; this is the same config (its 150 steps) judged on two concepts.
"""
from __future__ import annotations

import pytest

from unlearn_jax.config import load_config
from unlearn_jax.toy import evaluate as E
from unlearn_jax.toy.erasure import concept_entries, concept_entry
from repo_paths import ROOT



def test_concept_entry_uses_train_synonyms_only():
    e = concept_entry("colour", "red")
    assert e["phrase"] == "red" and set(e["aliases"]) == {"crimson", "scarlet"}
    text = " ".join(e["prompts"] + e["preserve"]).split()
    assert "ruby" not in text  # the held-out synonym
    assert all(any(w in p.split() for w in ("red", "crimson", "scarlet")) for p in e["prompts"])
    assert not any(w in p.split() for p in e["preserve"] for w in ("red", "crimson", "scarlet"))
    assert concept_entry("colour", "red", augment=False)["prompts"] == []
    assert concept_entry("motion", "up")["aliases"] == ["up", "rising", "upward"]
    with pytest.raises(ValueError, match="not a toy-world concept"):
        concept_entry("colour", "purple")


def test_concept_entries_keep_each_others_concepts_out_of_preservation():
    red, tri = concept_entries(["colour:red", ("shape", "triangle")])
    assert red["phrase"] == "red" and tri["phrase"] == "triangle"
    assert not any(w in p.split() for p in red["preserve"] for w in ("triangle", "wedge", "pyramid"))
    assert not any(w in p.split() for p in tri["preserve"] for w in ("red", "crimson", "scarlet"))
    assert concept_entries(["colour:red"])[0] == concept_entry("colour", "red")


def test_eval_prompts_avoid_erased_concepts():
    cfg = E.EvalConfig(n=8, avoid=("colour:red",))
    items = E.eval_prompts(cfg)
    for it in items:
        if it["concept"] != "colour:red":
            assert it["attributes"]["colour"] != "red"
    assert sum(it["concept"] == "colour:red" for it in items) == 2 * cfg.n


def test_erasure_removes_red_and_keeps_green(tmp_path):
    from helpers_erase import short_toy_erasure

    # the config's own 150 steps: cut to 50, most of red's videos are broken (half-way), not yet blue
    cmp = short_toy_erasure(ROOT / "configs" / "toy_world" / "erase_red.py", tmp_path / "run", steps=150)
    red, green = cmp["rates"]["colour:red"], cmp["rates"]["colour:green"]
    for split in ("train", "heldout"):
        assert red[split]["base"] >= 0.75
        # erased, not broken: a broken video counts as not erased
        assert red[split]["still"] <= red[split]["base"] - 0.5, (split, red)
        assert green[split]["erased"] >= green[split]["base"] - 0.25, (split, green)
        assert green[split]["broken_erased"] <= green[split]["broken_base"] + 0.15, (split, green)


def test_aliases_mark_synonym_tokens_as_the_concepts(tmp_path):
    from transformers import AutoTokenizer

    from unlearn_jax.erase_data import build_erase_data, concept_specs

    toy = ROOT / "assets" / "toy_world"
    entry = {"phrase": "red", "aliases": ["crimson", "scarlet"],
             "prompts": ["a crimson ball moving up", "a scarlet box moving left", "a ball moving up"]}
    data = build_erase_data(toy, concept_specs([entry]), default_eta=3.0, token_fallback="all")
    tok = AutoTokenizer.from_pretrained(toy / "tokenizer")
    words = []
    for row in data.pools[0]:
        ids = tok(data.prompts[row], padding="max_length", max_length=data.embeds.shape[1])["input_ids"]
        words.append([tok.convert_ids_to_tokens(ids[i]).lstrip("\u2581") for i, v in zip(data.concept_idx[row], data.concept_valid[row])
                      if v])
    assert words[0] == ["red"] and words[1] == ["crimson"] and words[2] == ["scarlet"]
    assert len(words[3]) == 4  # no synonym at all: the fallback marks every prompt token ("a ball moving up")


def test_bad_evaluate_settings_fail_before_training(tmp_path):
    from unlearn_jax.erase import run_erase
    from unlearn_jax.errors import UnlearnError

    c = load_config(ROOT / "configs" / "toy_world" / "erase_red.py")
    c.workdir = str(tmp_path / "run")
    c.evaluate.erased_concepts = ["colour:purple"]
    with pytest.raises(UnlearnError, match="unknown toy concepts"):
        run_erase(c, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, match", [
    ({"export.formats": ["zip"]}, "unknown format"),
    ({"export.formats": ["lora"]}, "cannot hold adapter erasers"),
])
def test_bad_export_settings_fail_before_training(tmp_path, override, match):
    from unlearn_jax.erase import run_erase
    from unlearn_jax.errors import UnlearnError

    c = load_config(ROOT / "configs" / "toy_world" / "erase_red.py")
    c.workdir = str(tmp_path / "run")
    for k, v in override.items():
        section, field = k.split(".")
        c[section][field] = v
    with pytest.raises(UnlearnError, match=match):
        run_erase(c, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
