"""loadtest/step_plan.py: the step-up / hold / step-down profile."""

from __future__ import annotations

import pytest

from loadtest.step_plan import StepPlan


def test_profile():
    plan = StepPlan.parse("2,4,8", step_time=10, hold_time=30)
    assert plan.segments() == [(10, 2), (10, 4), (30, 8), (10, 4), (10, 2)]
    assert plan.duration == 70
    expected = {0: 2, 9.9: 2, 10: 4, 19: 4, 20: 8, 49.9: 8, 50: 4, 60: 2, 69.9: 2}
    assert {t: plan.users_at(t) for t in expected} == expected
    assert plan.users_at(70) is None


def test_single_level_just_holds():
    plan = StepPlan.parse("5", step_time=10, hold_time=0)
    assert plan.segments() == [(10, 5)]  # no hold time: the peak lasts one step


@pytest.mark.parametrize("levels, step, hold", [("", 1, 1), ("2,x", 1, 1), ("0,2", 1, 1), ("2", 0, 1), ("2", 1, -1)])
def test_bad_plans(levels, step, hold):
    with pytest.raises(ValueError, match="--shape"):
        StepPlan.parse(levels, step, hold)
