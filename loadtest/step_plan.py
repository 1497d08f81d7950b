"""The step-up / hold / step-down profile behind loadtest/shape.py (no locust import, so it
is testable without gevent's monkey-patching)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    levels: tuple[int, ...]
    step_time: float
    hold_time: float

    def __post_init__(self) -> None:
        if not self.levels or any(n < 1 for n in self.levels):
            raise ValueError("--shape-levels must be a non-empty list of positive user counts")
        if self.step_time <= 0 or self.hold_time < 0:
            raise ValueError("--shape-step-time must be > 0 and --shape-hold-time >= 0")

    @classmethod
    def parse(cls, levels: str, step_time: float, hold_time: float) -> StepPlan:
        try:
            parsed = tuple(int(x) for x in levels.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--shape-levels must look like 2,4,8; got {levels!r}") from None
        return cls(parsed, step_time, hold_time)

    def segments(self) -> list[tuple[float, int]]:
        """(duration, users) in order: up the levels, hold the peak, back down."""
        up = [(self.step_time, n) for n in self.levels[:-1]]
        return [*up, (self.hold_time or self.step_time, self.levels[-1]), *reversed(up)]

    @property
    def duration(self) -> float:
        return sum(d for d, _ in self.segments())

    def users_at(self, t: float) -> int | None:
        """Users wanted ``t`` seconds into the test; None once the profile is over."""
        for duration, users in self.segments():
            if t < duration:
                return users
            t -= duration
        return None
