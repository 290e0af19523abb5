"""Erasure that can be seen: the default recipe on the bundled toy-world model removes a shape and keeps the rest.

The sweep of configs/toy_world/erase.py over the concepts (n = 64) is in the README;
this is the same recipe erasing a shape, judged at n = 8.
"""
from __future__ import annotations

import json

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


def test_the_default_recipe_erases_a_shape_and_keeps_the_rest(tmp_path):
    """configs/toy_world/erase.py with only the concept named (shape:triangle), stopped by its in-run check;
    judged at n = 8 on every concept (the README's sweep is n = 64): the triangle's rate, its broken videos
    counted as not erased, falls by at least half, and every other concept holds, broken videos included.
    Not asserted: the full target (the sweep shows where this recipe misses it for the triangle)."""
    from unlearn_jax.erase import run_erase

    c = load_config(f"{ROOT / 'configs' / 'toy_world' / 'erase.py'}:shape:triangle")
    c.workdir = str(tmp_path / "run")
    c.evaluate.n = 8
    c.export.formats = ["erasers"]
    out = run_erase(c, progress=False)
    assert out["check"]["checks"] >= 1 and out["step"] <= c.train.num_steps
    cmp = json.loads((tmp_path / "run" / "eval.json").read_text())["comparison"]
    print(out["table"])
    tri = cmp["rates"]["shape:triangle"]
    for split in ("train", "heldout"):
        assert tri[split]["base"] >= 0.75
        assert tri[split]["still"] <= tri[split]["base"] - 0.5, (split, tri[split])  # not by breaking the videos
        assert tri[split]["others_kept"]["erased"]["colour"] >= tri[split]["others_kept"]["base"]["colour"] - 0.25
    for name, row in cmp["rates"].items():
        if name == "shape:triangle":
            continue
        for split, cell in row.items():
            assert cell["erased"] >= cell["base"] - 0.25, (name, split, cell)
            assert cell["broken_erased"] <= cell["broken_base"] + 0.125, (name, split, cell)  # one video of 8


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
