"""Adversarial erasure (config.robust): every k-th step runs the inner soft attack and trains on what it finds;
the other steps are the plain step; the inner attack lowers the gap it attacks; off by default and refused in
one line when set wrong."""
import json
from pathlib import Path

import numpy as np
import pytest

from helpers_erase import build_erase_pipeline, tiny_erase_config
from unlearn_jax.erase import run_erase
from unlearn_jax.errors import UnlearnError


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_erase_pipeline(tmp_path_factory.mktemp("pipe"))


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_every_kth_step_attacks_and_trains_on_it(pipeline, tmp_path):
    plain_wd, robust_wd = tmp_path / "plain", tmp_path / "robust"
    common = {"train.num_steps": 5, "train.learning_rate": 3e-2}
    run_erase(tiny_erase_config(pipeline, plain_wd, **common), progress=False)
    s = run_erase(tiny_erase_config(pipeline, robust_wd, **common, **{"robust.every": 2, "robust.steps": 4,
                                                                        "robust.learning_rate": 0.1}),
                  progress=False)
    assert s["status"] == "completed" and set(s["robust_cost"]) == {"adversarial_step_s", "plain_step_s"}
    plain, robust = _metrics(plain_wd), _metrics(robust_wd)
    assert "adversarial" not in plain[0]  # off by default: the plain step, its metrics unchanged
    assert [r["adversarial"] for r in robust] == [1, 0, 1, 0, 1]
    # step 0 is the plain step's own start (zero erasers: nothing to attack yet); the plain steps' loss
    # equals the plain run's until the first adversarial update has moved the erasers apart
    assert robust[0]["attack_start"] < 1e-12
    assert robust[0]["loss_unlearn"] == pytest.approx(plain[0]["loss_unlearn"], rel=1e-6)
    assert robust[0]["loss_adv"] > 0
    for r in robust:
        if r["adversarial"]:
            assert r["attack_loss"] <= r["attack_start"] and r["loss_adv"] > 0, r
        else:
            assert r["loss_adv"] == 0 and r["attack_loss"] == 0, r
    later = [r for r in robust[1:] if r["adversarial"]]
    assert any(r["attack_loss"] < 0.9 * r["attack_start"] for r in later), later  # the attack finds something
    # at step 0 the attack starts at a zero gap, so it trains on the batch's own conditioning twice (Adam makes
    # that the plain update); from the adversarial step 2 on, the run departs from the plain one
    assert not np.isclose(robust[3]["loss_unlearn"], plain[3]["loss_unlearn"], rtol=1e-3), (robust[3], plain[3])


@pytest.mark.parametrize("field, value, needle", [("robust.every", -1, "an integer >= 0"),
                                                  ("robust.method", "tokens", "soft"),
                                                  ("robust.steps", 0, "an integer >= 1"),
                                                  ("robust.learning_rate", 0.0, "> 0")])
def test_bad_robust_settings_are_one_line(pipeline, tmp_path, field, value, needle):
    with pytest.raises(UnlearnError) as e:
        run_erase(tiny_erase_config(pipeline, tmp_path / "wd", **{field: value}), progress=False)
    assert needle in str(e.value) and field in str(e.value) and "\n" not in str(e.value)
