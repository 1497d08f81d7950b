"""A step-up / hold / step-down load shape that exercises the autoscaler.

Use it next to the locustfile (a shape in the locustfile itself would replace -u/-r for every run):

    locust -f loadtest/locustfile.py,loadtest/shape.py --headless -H http://127.0.0.1:8000 \
        --csv results/shape --shape-levels 2,4,8 --shape-step-time 60 --shape-hold-time 120

Profile for levels ``a,b,c``: ``a`` users for step-time, ``b`` for step-time, ``c`` (the peak)
for hold-time, then ``b`` and ``a`` for step-time each, then the test stops. With
``--pacing poisson`` each user is a Poisson source, so the levels are arrival-rate steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from locust import LoadTestShape, events

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # locust imports this file by path; make `loadtest` importable
    sys.path.insert(0, str(_ROOT))

from loadtest.step_plan import StepPlan  # noqa: E402

_ENV = "CBSERVE_LT_"


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--shape-levels",
        type=str,
        default=os.environ.get(_ENV + "SHAPE_LEVELS", "1,2,4"),
        help=f"user counts of the steps, peak last (default 1,2,4) [env {_ENV}SHAPE_LEVELS]",
    )
    parser.add_argument(
        "--shape-step-time",
        type=float,
        default=float(os.environ.get(_ENV + "SHAPE_STEP_TIME", 60)),
        help=f"seconds per step (default 60) [env {_ENV}SHAPE_STEP_TIME]",
    )
    parser.add_argument(
        "--shape-hold-time",
        type=float,
        default=float(os.environ.get(_ENV + "SHAPE_HOLD_TIME", 120)),
        help=f"seconds at the peak (default 120) [env {_ENV}SHAPE_HOLD_TIME]",
    )
    parser.add_argument(
        "--shape-spawn-rate",
        type=float,
        default=float(os.environ.get(_ENV + "SHAPE_SPAWN_RATE", 10)),
        help=f"users started/stopped per second at a step (default 10) [env {_ENV}SHAPE_SPAWN_RATE]",
    )


class StepLoadShape(LoadTestShape):
    """Steps users up, holds the peak, steps down (see the module docstring)."""

    _plan: StepPlan | None = None

    def plan(self) -> StepPlan:
        if self._plan is None:
            o = self.runner.environment.parsed_options
            self._plan = StepPlan.parse(
                getattr(o, "shape_levels", "1,2,4"),
                getattr(o, "shape_step_time", 60.0),
                getattr(o, "shape_hold_time", 120.0),
            )
        return self._plan

    def tick(self) -> tuple[int, float] | None:
        users = self.plan().users_at(self.get_run_time())
        if users is None:
            return None
        rate = getattr(self.runner.environment.parsed_options, "shape_spawn_rate", 10.0)
        return users, rate
