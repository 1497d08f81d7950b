"""A launched step whose sampled tokens the host has not read yet.

``ModelRunner.launch`` returns one; ``result()`` blocks until the step's tokens are on the host.
With async scheduling the engine launches step N+1 (whose inputs name step N's tokens by row,
see ``PLACEHOLDER_TOKEN``) before it calls ``result()`` on step N, so the host's bookkeeping
for N runs while the device computes N+1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from replica.outputs import RunnerOutput


class PendingStep(Protocol):
    @property
    def request_ids(self) -> tuple[str, ...]:
        """Requests that sample in this step, in row order."""
        ...

    def result(self) -> RunnerOutput: ...


class DeferredStep:
    """A step computed on the host's schedule: ``compute`` runs at the first ``result()``.

    Eager (non-graph) steps use it: running them at ``result()`` instead of at ``launch``
    keeps the same order of device work (a step is always forced before the next one
    reads its tokens) and gives CPU runs the exact control flow of an asynchronous GPU
    step, so the async-scheduling logic is tested everywhere.
    """

    def __init__(self, request_ids: tuple[str, ...], compute: Callable[[], RunnerOutput]) -> None:
        self._ids = request_ids
        self._compute: Callable[[], RunnerOutput] | None = compute
        self._result: RunnerOutput | None = None

    @property
    def request_ids(self) -> tuple[str, ...]:
        return self._ids

    def result(self) -> RunnerOutput:
        if self._result is None:
            compute, self._compute = self._compute, None
            if compute is None:
                raise RuntimeError("this step failed earlier; its result is gone")
            self._result = compute()
        return self._result
