"""How samples become optimizer steps: the batch layout, the global order, and fixed eval batches.

`BatchLayout` is the one place that divides the global batch: global = micro batch × accumulation ×
data-parallel ranks. The engine, autobatch, the config checks and every loader ask it.

`GlobalOrder`: epoch e visits the samples in `default_rng([seed, e]).permutation(num_samples)`; the
epochs are chained into one endless sequence of positions and step k consumes positions
[k*G, (k+1)*G). Every rank computes the same order, so a global batch depends only on the data, the
seed and G: not on the number of ranks or the micro batch. Resuming needs one number,
`samples_consumed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import PipelineError

AUTO = "auto"  # micro_batch_size=auto: probed before training (pipeline/train/autobatch.py)
IGNORE_INDEX = -100  # label of positions that carry no loss (the finetune stage masks prompts with it)


def working_ranks(global_batch: int, micro_batch: int) -> str:
    """The rank counts that keep `global_batch` whole with `micro_batch` (a resume on another allocation may
    only pick one of these without changing the global batch)."""
    if global_batch < 1 or micro_batch < 1 or global_batch % micro_batch:
        return f"no rank count divides it with micro batch {micro_batch}"
    ranks = [r for r in range(1, global_batch // micro_batch + 1) if global_batch % (r * micro_batch) == 0]
    return f"rank counts that work with micro batch {micro_batch}: {', '.join(map(str, ranks))}"




@dataclass(frozen=True)
class BatchLayout:
    global_batch: int  # sequences per optimizer step, over all ranks
    micro_batch: int  # sequences per rank and forward pass
    world: int  # data-parallel ranks
    key: str = "train"  # the config section, for messages

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.world < 1:
            raise PipelineError(f"bad data-parallel layout: {self.key}.micro_batch_size={self.micro_batch}, "
                                f"{self.world} ranks")
        per_step = self.micro_batch * self.world
        if self.global_batch < 1 or self.global_batch % per_step:
            raise PipelineError(f"{self.key}.global_batch_size={self.global_batch} is not a multiple of "
                                f"{self.key}.micro_batch_size × data-parallel ranks = {self.micro_batch} × "
                                f"{self.world} = {per_step}: make it a multiple of {per_step}, or change "
                                f"{self.key}.micro_batch_size or the number of ranks (launch.nproc_per_node); "
                                f"{working_ranks(self.global_batch, self.micro_batch)}")

    @classmethod
    def of(cls, section, key: str, world: int) -> "BatchLayout":
        """The layout of a train/finetune config section (micro_batch_size resolved) on `world` ranks."""
        return cls(section.global_batch_size, section.micro_batch_size, world, key)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def accumulation(self) -> int:
        """Micro batches per rank and optimizer step."""
        return self.per_rank // self.micro_batch

    @staticmethod
    def check(section, key: str, world: int) -> None:
        """Refuse a config section whose batch sizes cannot be laid out on `world` ranks. With
        micro_batch_size=auto, the ranks must divide the global batch (auto picks a divisor of the rest)."""
        if section.micro_batch_size != AUTO:
            BatchLayout.of(section, key, world)
        elif section.global_batch_size % world:
            raise PipelineError(f"{key}.global_batch_size={section.global_batch_size} is not a multiple of the "
                                f"{world} data-parallel ranks, so no {key}.micro_batch_size=auto can divide it: "
                                f"make it a multiple of {world} or change the number of ranks "
                                f"(launch.nproc_per_node); {working_ranks(section.global_batch_size, 1)}")

    @staticmethod
    def micro_batch_choices(section, key: str, world: int) -> list[int]:
        """Micro batches that keep accumulation whole on `world` ranks: the divisors of global / ranks."""
        BatchLayout.check(section, key, world)
        per_rank = section.global_batch_size // world
        return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


class GlobalOrder:
    """The seeded, epoch-chained order of `num_samples` samples, and how far training has consumed it."""

    def __init__(self, num_samples: int, layout: BatchLayout, seed: int):
        self.num_samples, self.layout, self.seed = num_samples, layout, seed
        self.samples_consumed = 0  # positions used by all ranks so far: the whole resume state
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.samples_consumed // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (the same on every rank); the last two are cached."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global positions [start, stop) of the epoch-chained order."""
        positions = np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(positions.size, np.int64)
        for epoch in np.unique(epochs).tolist():  # one or two epochs per batch, unless the data is tiny
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[offsets[mask]]
        return out

    def step_ids(self, step_start: int) -> np.ndarray:
        """The global batch that starts at position `step_start`."""
        return self.sample_ids(step_start, step_start + self.layout.global_batch)

    def rank_ids(self, step_start: int, rank: int) -> np.ndarray:
        """Rank `rank`'s contiguous slice of that global batch, as [accumulation, micro batch]."""
        layout = self.layout
        first = step_start + rank * layout.per_rank
        return self.sample_ids(first, first + layout.per_rank).reshape(layout.accumulation, layout.micro_batch)

    def advance(self) -> None:
        """One step's data has been built: the next step starts after it."""
        self.samples_consumed += self.layout.global_batch

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "epoch": self.epoch, "seed": self.seed,
                "global_batch_size": self.layout.global_batch}

    def load_samples_consumed(self, consumed) -> None:
        if not isinstance(consumed, int) or consumed < 0 or consumed % self.layout.global_batch:
            raise PipelineError(f"refusing to resume: samples_consumed={consumed!r} in the checkpoint is not a "
                                f"multiple of global_batch_size={self.layout.global_batch}")
        self.samples_consumed = consumed


class FixedBatches:
    """Validation batches, re-iterable: batch b holds samples [b*B*W, (b+1)*B*W) and rank r takes
    [b*B*W + r*B, +B) of it (B = micro batch, W = ranks). Every rank gets the same number of batches
    (ZeRO 3 runs the forward passes collectively)."""

    def __init__(self, available: int, batch_size: int, num_batches: int, rank: int, world: int,
                 make_batch: Callable[[np.ndarray], tuple]):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise PipelineError(f"bad eval layout: batch_size={batch_size}, rank={rank}, ranks={world}")
        self.full = available // (batch_size * world)  # whole batches the split holds
        self.num_batches = max(0, min(num_batches, self.full))
        self.batch_size, self.rank, self.world, self.make_batch = batch_size, rank, world, make_batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        for b in range(self.num_batches):
            first = (b * self.world + self.rank) * self.batch_size
            yield self.make_batch(np.arange(first, first + self.batch_size, dtype=np.int64))
