"""The in-run check's judgement (a pure function of detections) and its config rules."""
from __future__ import annotations

import pytest

from unlearn_jax.toy.run_check import CheckSettings, judge

S = CheckSettings()


def _items(spec):
    """spec: {concept: n} -> items as eval_prompts makes them."""
    out = []
    for name, n in spec.items():
        attr, value = name.split(":")
        out += [{"concept": name, "attribute": attr, "value": value} for _ in range(n)]
    return out


def _det(items, shown=None, broken=None):
    """Detections: every item shows its value except the indices in `shown`'s complement; `broken`: indices
    flagged broken."""
    out = []
    for i, it in enumerate(items):
        ok = shown is None or i in shown
        d = {"colour": "blue", "shape": "square", "motion": "left"}
        if ok:
            d[it["attribute"]] = it["value"]
        elif d[it["attribute"]] == it["value"]:
            d[it["attribute"]] = "green" if it["attribute"] == "colour" else "circle"
        if broken and i in broken:
            d["broken"] = "flooded"
        out.append(d)
    return out


SPEC = {"colour:red": 16, "colour:green": 8, "shape:circle": 8, "motion:up": 8}
ITEMS = _items(SPEC)
RED = range(16)
OTHERS = range(16, 40)


def test_gone_and_intact_is_reached():
    base = _det(ITEMS)
    now = _det(ITEMS, shown=set(OTHERS))
    v = judge(ITEMS, base, now, ["colour:red"], S)
    assert v["erased_rate"] == 0.0 and v["pooled_drop"] == 0.0 and not v["harmed"] and v["reached"]


def test_broken_erased_videos_are_not_erased_and_many_are_an_overshoot():
    base = _det(ITEMS)
    v = judge(ITEMS, base, _det(ITEMS, shown=set(OTHERS), broken={0, 1}), ["colour:red"], S)
    assert v["erased_rate"] == 0.125 and v["erased_broken"] == 0.125 and not v["reached"] and not v["harmed"]
    v = judge(ITEMS, base, _det(ITEMS, shown=set(OTHERS), broken={0}), ["colour:red"], S)
    assert v["erased_rate"] == 1 / 16 and v["reached"]  # erased_target 0.07: at most one video of 16
    v = judge(ITEMS, base, _det(ITEMS, shown=set(OTHERS), broken=set(range(8))), ["colour:red"], S)
    assert v["erased_broken"] == 0.5 and v["harmed"] and v["reasons"] == ["0.50 of the erased concept's videos broken"]


def test_one_concept_losing_three_of_eight_is_harm():
    base = _det(ITEMS)
    lost = {16, 17, 18}  # three green videos
    now = _det(ITEMS, shown=set(OTHERS) - lost)
    v = judge(ITEMS, base, now, ["colour:red"], S)
    assert v["max_drop_concept"] == "colour:green" and v["max_drop"] == pytest.approx(3 / 8)
    assert v["harmed"] and not v["reached"]
    # two of eight is within the single-concept margin, but 2 of 24 pooled (0.083) is beyond pooled_margin
    v2 = judge(ITEMS, base, _det(ITEMS, shown=set(OTHERS) - {16, 17}), ["colour:red"], S)
    assert v2["max_drop"] == 0.25 and v2["pooled_drop"] == pytest.approx(2 / 24) and v2["harmed"]
    loose = CheckSettings(pooled_margin=0.1)
    assert not judge(ITEMS, base, _det(ITEMS, shown=set(OTHERS) - {16, 17}), ["colour:red"], loose)["harmed"]


def test_more_broken_other_videos_is_harm_even_when_the_rates_hold():
    base = _det(ITEMS)
    loose = CheckSettings(pooled_margin=1.0, drop_margin=1.0)
    now = _det(ITEMS, shown=set(OTHERS), broken={20, 30})
    v = judge(ITEMS, base, now, ["colour:red"], loose)
    assert v["broken_increase"] == pytest.approx(2 / 24) and v["harmed"]


def test_drops_are_measured_against_the_base_model():
    # a concept the base model already misses does not count as harmed when it still misses it
    base = _det(ITEMS, shown=set(range(40)) - {16, 17, 18, 19})
    now = _det(ITEMS, shown=set(OTHERS) - {16, 17, 18, 19})
    v = judge(ITEMS, base, now, ["colour:red"], S)
    assert v["max_drop"] == 0.0 and v["reached"]


def test_check_config_rules():
    from unlearn_jax.erase_checks import problems
    from unlearn_jax.erase_config import default_config

    c = default_config()
    c.model.path = "x"
    c.check.every = 25
    assert any("in-run check judges with the toy world's detector" in p for p in problems(c))
    c.evaluate.toy_world = True
    assert any("needs config.evaluate.erased_concepts" in p for p in problems(c))
    c.evaluate.erased_concepts = ["colour:red"]
    assert problems(c) == []
    c.distributed.enabled = True
    assert any("runs in one process" in p for p in problems(c))
    c.distributed.enabled = False
    c.check.lr_decay = 1.0
    assert any(p.startswith("config.check.lr_decay=1.0: must be") for p in problems(c))


def test_check_fields_and_the_evaluate_fields_it_reads_are_trajectory_fields():
    from unlearn_jax.erase_checks import trajectory_changes
    from unlearn_jax.erase_config import default_config

    a = default_config()
    b = default_config()
    b.check.drop_margin = 0.3
    assert trajectory_changes(a.to_dict(), b.to_dict()) == ["check.drop_margin"]
    b = default_config()
    b.evaluate.num_steps = 10  # read only by the final evaluation while the check is off
    assert trajectory_changes(a.to_dict(), b.to_dict()) == []
    a.check.every = b.check.every = 25
    assert trajectory_changes(a.to_dict(), b.to_dict()) == ["evaluate.num_steps"]


# ---- the loop's use of the verdicts (a scripted checker: the decisions, not the videos, are tested here) ----
PASS = {"erased_rate": 0.5, "erased_broken": 0.0, "max_drop": 0.0, "max_drop_concept": "colour:green",
        "pooled_drop": 0.0, "broken_increase": 0.0, "harmed": False, "reached": False}
HARM = {**PASS, "harmed": True, "max_drop": 0.5}
DONE = {**PASS, "erased_rate": 0.0, "reached": True}


def _scripted(monkeypatch, verdicts, seen):
    from unlearn_jax.toy import run_check

    class Scripted:
        def __init__(self, *a, **k):
            pass

        def judge_phi(self, base, phi):
            import jax
            import numpy as np

            seen.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(phi)]).copy())
            return verdicts.pop(0)

    monkeypatch.setattr(run_check, "ToyCheck", Scripted)


def _loop_config(workdir):
    from unlearn_jax.config import load_config
    from repo_paths import ROOT

    c = load_config(ROOT / "configs" / "toy_world" / "erase_red.py")
    c.workdir = str(workdir)
    c.train.num_steps, c.train.batch_size, c.sampler.num_steps = 12, 1, 5
    c.sampler.xt_source, c.sampler.bank_size = "frozen_bank", 1
    c.check.every = 3
    c.check.confirm = 1
    c.export.formats = ["erasers"]
    c.evaluate.n, c.evaluate.num_steps = 1, 2
    return c


def test_a_harmful_check_reverts_lowers_the_rate_and_a_resumed_run_ends_the_same(monkeypatch, tmp_path):
    import json

    import numpy as np

    from unlearn_jax.erase import run_erase

    seen = []
    _scripted(monkeypatch, [PASS, HARM, PASS, DONE], seen)
    out = run_erase(_loop_config(tmp_path / "a"), progress=False)
    assert out["check"]["outcome"] == "target reached at step 9" and out["check"]["reverts"] == 1
    assert out["check"]["learning_rate_scale"] == 0.5 and out["step"] == 9
    assert "in_run_check" in json.loads((tmp_path / "a" / "eval.json").read_text())
    recs = [json.loads(x) for x in (tmp_path / "a" / "checks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 6, 6, 9]
    assert recs[1]["action"] == "reverted to step 3, learning rate x0.5" and recs[1]["good_step"] == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # the reverted branch's records are gone
    assert not np.array_equal(seen[1], seen[2])  # steps 4-6 were trained again, at the lower rate
    phi_a = seen[-1]

    # the same run stopped after 7 steps (after the revert) and resumed: the same erasers at the end
    seen = []
    _scripted(monkeypatch, [PASS, HARM, PASS, DONE], seen)
    c = _loop_config(tmp_path / "b")
    first = run_erase(c, progress=False, stop_after_steps=7)
    assert first["check"]["outcome"].startswith("not ended") and "exports" not in first
    out = run_erase(_loop_config(tmp_path / "b"), progress=False)
    assert out["check"]["outcome"] == "target reached at step 9"
    np.testing.assert_array_equal(seen[-1], phi_a)
    # a rerun of the ended run trains nothing more
    again = run_erase(_loop_config(tmp_path / "b"), progress=False)
    assert again["step"] == 9 and again["check"]["outcome"] == "target reached at step 9"


def test_too_many_reverts_stop_at_the_last_state_that_passed(monkeypatch, tmp_path):
    from unlearn_jax.erase import run_erase

    seen = []
    _scripted(monkeypatch, [PASS, HARM, HARM], seen)
    c = _loop_config(tmp_path / "r")
    c.check.max_reverts = 1
    out = run_erase(c, progress=False)
    assert out["step"] == 3 and out["check"]["reverts"] == 2 and not out["check"]["reached"]
    assert "stopped at the last state that passed (step 3)" in out["check"]["outcome"]
    assert out["erasure_target"] in ("met", "NOT met") and "in-run check: harm found 2 times" in out["table"]


def test_the_concept_must_be_gone_at_confirm_checks_in_a_row(monkeypatch, tmp_path):
    import json

    from unlearn_jax.erase import run_erase

    seen = []
    _scripted(monkeypatch, [DONE, PASS, DONE, DONE], seen)  # gone, back again, then gone twice
    c = _loop_config(tmp_path / "c")
    c.check.confirm = 2
    out = run_erase(c, progress=False)
    assert out["check"]["outcome"] == "target reached at step 12" and out["check"]["reached"]
    recs = [json.loads(x) for x in (tmp_path / "c" / "checks.jsonl").read_text().splitlines()]
    assert [r["streak"] for r in recs] == [1, 0, 1, 2]
    assert recs[0]["action"] == "gone (1 of 2 checks in a row): kept"
    # the budget spent with the concept gone once at the end: said, not "reached"
    _scripted(monkeypatch, [PASS, PASS, PASS, DONE], seen)
    out = run_erase(_confirm2(tmp_path / "d"), progress=False)
    assert not out["check"]["reached"] and "without the target confirmed" in out["check"]["outcome"]


def _confirm2(workdir):
    c = _loop_config(workdir)
    c.check.confirm = 2
    return c
