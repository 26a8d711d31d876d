"""Fault injection for the test suite, parsed once from the environment and attached only when asked for.

- PIPELINE_TEST_NAN_AT=STEP[-LAST]:RANK[:FACTOR][,...]: at those steps that rank's first micro batch loss
  is multiplied by FACTOR (default nan; e.g. 1000 for a loss spike).
- PIPELINE_TEST_SKIP_RESTORE=rng|loader: a resume leaves that state as it is (proves the restore matters).
- PIPELINE_TEST_KILL_IN_SAVE=STEP:POINT[:RANK] (rank 0 by default): the rank SIGKILLs itself at that point
  of the save of STEP, as a node failure would (points: see checkpoint._commit), or of the conversion of
  the checkpoint of STEP to the universal format (points universal, universal-rename: elastic.convert).
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from functools import cache

ENV = ("PIPELINE_TEST_NAN_AT", "PIPELINE_TEST_SKIP_RESTORE", "PIPELINE_TEST_KILL_IN_SAVE")


@dataclass(frozen=True)
class Faults:
    loss_factors: tuple[tuple[int, int, int, float], ...] = ()  # (first step, last step, rank, factor)
    skip_restore: str = ""
    kill_in_save: tuple[int, str, int] | None = None  # (step, point, rank)

    @classmethod
    def parse(cls, env: dict[str, str]) -> "Faults":
        factors = []
        for item in filter(None, env.get("PIPELINE_TEST_NAN_AT", "").split(",")):
            steps, rank, *factor = item.split(":")
            first, _, last = steps.partition("-")
            factors.append((int(first), int(last or first), int(rank), float(factor[0]) if factor else math.nan))
        kill = None
        if env.get("PIPELINE_TEST_KILL_IN_SAVE"):
            step, point, *rank = env["PIPELINE_TEST_KILL_IN_SAVE"].split(":")
            kill = (int(step), point, int(rank[0]) if rank else 0)
        return cls(tuple(factors), env.get("PIPELINE_TEST_SKIP_RESTORE", ""), kill)

    def loss_factor(self, step: int, rank: int) -> float | None:
        return next((f for first, last, r, f in self.loss_factors if first <= step <= last and r == rank), None)


@cache
def injected() -> Faults | None:
    """The faults the environment asks for, or None (the usual case: nothing is attached)."""
    return Faults.parse(dict(os.environ)) if any(os.environ.get(name) for name in ENV) else None


def kill_point(step: int, point: str, rank: int) -> None:
    faults = injected()
    if faults is not None and faults.kill_in_save == (step, point, rank):
        os.kill(os.getpid(), signal.SIGKILL)
