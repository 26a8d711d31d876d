"""Data mixtures: which sources a run has, and how their train windows are blended into global batches.

Blend: target_s(p) is source s's weight share of the first p positions (with data.phases, the sum over the
phases of each one's share of its positions). Source s's k-th sample is due at the position where target_s
reaches k, and global position p (step k reads [k*G, (k+1)*G)) takes the p-th due sample, ties to the first
name in sorted order: stride scheduling, an equivalent of Megatron's greedy rule that keeps every source
within one sample of its target at every position, computed for a whole step at once. Source s's own samples come
from its own seeded, epoch-chained `GlobalOrder`. Every rank computes the whole global batch and takes its
slice, so the batches depend on neither the rank count nor the micro batch; the resume state is the
position and each source's sample count: one small record, the same on every rank.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import DataConfig, PhaseConfig, SourceConfig
from ..errors import PipelineError
from .batching import BatchLayout, GlobalOrder
from .stream import _check_pin, _to_batch, check_rank, check_resume_settings, num_windows

log = logging.getLogger(__name__)

ONE_SOURCE = "corpus"  # the source name of data=files with data.paths (and of single-corpus manifests)


def mixture_sources(data: DataConfig, default_dir: Path) -> dict[str, SourceConfig]:
    """The run's sources by name, sorted: data.sources (built-in ones pointed at their generated file),
    or data.paths as the one source `corpus`."""
    if data.sources:
        from .default_corpus import source_file

        out = {}
        for name, source in sorted(data.sources.items()):
            if data.source == "default" and not source.paths and not source.shards:
                source = replace(source, paths=[str(default_dir / source_file(name))], text_field="text",
                                 split_on_blank_lines=False)
            out[name] = source
        return out
    if data.source == "default":
        from .default_corpus import SOURCES

        return mixture_sources(replace(data, sources={n: SourceConfig(weight=w) for n, w in SOURCES.items()}),
                               default_dir)
    return {ONE_SOURCE: SourceConfig(paths=list(data.paths), text_field=data.text_field,
                                     split_on_blank_lines=data.split_on_blank_lines)}


def source_seed(seed: int, name: str) -> int:
    """Each source's own order: seeded by its name, so adding a source reorders none of the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class Blend:
    """Cumulative per-source targets over global positions, from the weights and data.phases."""

    def __init__(self, names: list[str], weights: dict[str, float], phases: list[PhaseConfig],
                 global_batch: int):
        self.names = list(names)
        phases = phases or [PhaseConfig(step=0, weights=dict(weights))]
        self.starts = np.array([p.step * global_batch for p in phases], np.float64)  # positions
        table = np.array([[float(p.weights.get(n, 0.0)) for n in self.names] for p in phases], np.float64)
        self.shares = table / table.sum(axis=1, keepdims=True)  # [phases, sources]
        self._at_starts = self.targets(self.starts)
        self.description = [{"step": p.step, "weights": {n: round(float(w), 6) for n, w in zip(self.names, row)}}
                            for p, row in zip(phases, self.shares)]

    def targets(self, positions: np.ndarray) -> np.ndarray:
        """[len(positions), sources]: each source's share of the first `positions` samples."""
        positions = np.asarray(positions, np.float64)[:, None]
        ends = np.append(self.starts[1:], np.inf)[None, :]
        inside = np.clip(np.minimum(positions, ends) - self.starts[None, :], 0, None)  # [n, phases]
        return inside @ self.shares

    def event_positions(self, source: int, ks: np.ndarray) -> np.ndarray:
        """The position at which source `source`'s target first reaches each k of `ks` (inf: never)."""
        breaks = np.append(self.starts, np.inf)
        at_breaks = self._at_starts[:, source]  # target at each phase start
        segment = np.searchsorted(at_breaks, ks, side="left") - 1  # at_breaks[j] < k <= at_breaks[j + 1]
        share = self.shares[segment, source]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.starts[segment] + (ks - at_breaks[segment]) / share
        out[share <= 0] = np.inf
        return np.minimum(out, breaks[segment + 1])

    def assign(self, count: int, taken: np.ndarray) -> np.ndarray:
        """The source of the next `count` positions, given each source's count of the positions before (they
        decide where the sequence stands); advances `taken` in place. The next sample of each source is due where its target reaches its count
        + 1 (stride scheduling: every source stays within one sample of its target); the positions take the
        earliest due samples in order, ties to the first source."""
        if len(self.names) == 1:
            taken[0] += count
            return np.zeros(count, np.int64)
        ks = (taken[:, None] + np.arange(1, count + 1)[None, :]).astype(np.float64)  # each source's next samples
        if len(self.starts) == 1:  # one phase: due at k / share
            with np.errstate(divide="ignore"):
                due = np.where(self.shares[0][:, None] > 0, ks / self.shares[0][:, None], np.inf)
        else:
            due = np.stack([self.event_positions(s, ks[s]) for s in range(len(self.names))])
        source = np.broadcast_to(np.arange(len(self.names))[:, None], due.shape)
        order = np.lexsort((source.ravel(), due.ravel()))[:count]  # by due position, then source
        ordered = source.ravel()[order]
        # the chosen samples come in each source's own order, so positions sorted by due keep that order
        taken += np.bincount(ordered, minlength=len(self.names))
        return ordered


@dataclass(frozen=True)
class PlannedSource:
    name: str
    windows: int  # train windows of seq_len + 1 the source holds
    samples: int  # windows the whole run will take from it
    seq_len: int

    @property
    def repetitions(self) -> float:
        return self.samples / self.windows


def plan(blend: Blend, windows: dict[str, int], seq_len: int, max_steps: int, global_batch: int,
         max_repetitions: float, echo: bool = True) -> list[PlannedSource]:
    """Each source's planned windows over train.max_steps (logged with echo); an error where one is seen
    over max_repetitions times."""
    total = blend.targets(np.array([max_steps * global_batch]))[0]
    planned = [PlannedSource(n, windows[n], int(round(t)), seq_len) for n, t in zip(blend.names, total)]
    for p in planned if echo else []:
        log.info("data: source %s: %d train windows (%.2fM tokens), planned %d windows (%.2fM tokens) over "
                 "%d steps: %.2f× repeated", p.name, p.windows, p.windows * seq_len / 1e6, p.samples,
                 p.samples * seq_len / 1e6, max_steps, p.repetitions)
    over = [p for p in planned if p.repetitions > max_repetitions]
    if over:
        shown = ", ".join(f"{p.name} {p.repetitions:.2f}×" for p in over)
        raise PipelineError(f"data: source(s) would be repeated more than data.max_repetitions={max_repetitions:g} "
                            f"times ({shown}): add data, lower their weight or train.max_steps, or raise "
                            f"data.max_repetitions")
    return planned


class MixtureLoader:
    """Train batches of a mixture: each `next_global_batch()` is one optimizer step's data for this rank."""

    def __init__(self, streams: dict, blend: Blend, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, pin_memory: bool = False,
                 document_mask: bool = False):
        check_rank(dp_rank, dp_world)
        _check_pin(pin_memory)
        self.layout = BatchLayout(global_batch_size, micro_batch_size, dp_world, "train")
        self.names = blend.names
        self.streams = [streams[n] for n in self.names]
        self.blend, self.seq_len, self.seed = blend, seq_len, seed
        self.dp_rank, self.pin_memory = dp_rank, pin_memory
        self.windows = [num_windows(s, seq_len) for s in self.streams]
        self.orders = [GlobalOrder(n, self.layout, source_seed(seed, name)) for n, name in zip(self.windows, self.names)]
        self.samples_consumed = 0
        self.taken = np.zeros(len(self.names), np.int64)  # samples taken from each source so far
        dtype = np.result_type(*[s.dtype for s in self.streams])
        self._windows = np.empty((self.layout.per_rank, seq_len + 1), dtype)
        self._sorted = np.empty_like(self._windows)  # the rank's windows grouped by source
        self.eos_id = self.streams[0].eos_id if document_mask else None  # batches carry document segments

    def step_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch as (source index, window id within the source) per position; taken is not advanced."""
        taken = self.taken.copy()
        sources = self.blend.assign(self.layout.global_batch, taken)
        ids = np.empty_like(sources)
        for s in np.unique(sources).tolist():
            mask = sources == s
            ids[mask] = self.orders[s].sample_ids(int(self.taken[s]), int(taken[s]))
        return sources, ids

    def next_global_batch(self) -> list:
        sources, ids = self.step_sources()
        layout = self.layout
        first = self.dp_rank * layout.per_rank
        mine_s, mine_i = sources[first:first + layout.per_rank], ids[first:first + layout.per_rank]
        if len(self.names) == 1:
            self.streams[0].gather_windows(mine_i * self.seq_len, self._windows)
        else:  # one gather per source and step into contiguous blocks, then one reorder
            order = np.argsort(mine_s, kind="stable")
            bounds = np.searchsorted(mine_s[order], np.arange(len(self.names) + 1))
            for s in np.flatnonzero(np.diff(bounds)).tolist():
                lo, hi = int(bounds[s]), int(bounds[s + 1])
                self.streams[s].gather_windows(mine_i[order[lo:hi]] * self.seq_len, self._sorted[lo:hi])
            self._windows[order] = self._sorted
        micro = layout.micro_batch
        batches = [_to_batch(self._windows[m * micro:(m + 1) * micro], self.pin_memory, self.eos_id)
                   for m in range(layout.accumulation)]
        self.taken += np.bincount(sources, minlength=len(self.names))  # only once the whole step's data exists
        self.samples_consumed += layout.global_batch
        return batches

    def tokens_seen(self) -> dict[str, int]:
        """Input tokens taken from each source so far, over all ranks: `tokens_seen/<source>`."""
        return {f"tokens_seen/{n}": int(t) * self.seq_len for n, t in zip(self.names, self.taken)}

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed,
                "global_batch_size": self.layout.global_batch, "seq_len": self.seq_len,
                "sources": {n: int(t) for n, t in zip(self.names, self.taken)},
                "fingerprint": {n: dict(s.fingerprint) for n, s in zip(self.names, self.streams)},
                "blend": self.blend.description}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (any rank count or micro batch); data, seq_len, seed and
        the global batch must be those of the checkpoint."""
        mine = self.state_dict()
        if state.get("fingerprint") != mine["fingerprint"]:
            raise PipelineError(f"refusing to resume: the sources or their shards changed since the checkpoint "
                                f"(checkpoint {sorted(state.get('fingerprint') or {})}, now {sorted(self.names)}, "
                                f"or their contents): restore them or start a new run")
        check_resume_settings(state, mine)
        consumed, counts = state.get("samples_consumed"), state.get("sources") or {}
        if not isinstance(consumed, int) or consumed < 0 or consumed % self.layout.global_batch \
                or sorted(counts) != sorted(self.names) or sum(counts.values()) != consumed:
            raise PipelineError(f"refusing to resume: the checkpoint's loader state {state!r} is inconsistent")
        if state.get("blend") != mine["blend"]:
            log.warning("data: the mixture's weights changed since the checkpoint (%s, now %s): the blend steers "
                        "towards the new shares from here", state.get("blend"), mine["blend"])
        self.samples_consumed = consumed
        self.taken = np.array([counts[n] for n in self.names], np.int64)


def open_mixture(shards_dir: Path, tokenizer: Path, data: DataConfig, default_dir: Path, seq_len: int,
                 global_batch: int, verify: str) -> tuple[dict, Blend, dict[str, int]]:
    """The train split of every source in the shards, the blend of their configured weights, and each one's
    train windows; an error where the shards hold several sources and not those the config names."""
    from .stream import manifest_sources, open_split

    names = manifest_sources(shards_dir)
    configured = mixture_sources(data, default_dir)
    if len(names) == 1:  # one source has no share to choose: whatever the config's data section says
        configured, data = {names[0]: SourceConfig(weight=1.0)}, replace(data, phases=[])
    if sorted(configured) != names:
        raise PipelineError(f"the shards hold the sources {names} but the config names {sorted(configured)}: "
                            f"rerun stages=[shard] (or fix data.sources)")
    streams = {n: open_split(shards_dir, "train", tokenizer, verify, source=n) for n in names}
    blend = Blend(names, {n: configured[n].weight for n in names}, data.phases, global_batch)
    return streams, blend, {n: num_windows(s, seq_len) for n, s in streams.items()}


def source_eval_batches(shards_dir: Path, tokenizer: Path, names: list[str], seq_len: int, batch_size: int,
                        num_batches: int, rank: int, world: int, verify: str, document_mask: bool = False) -> dict:
    """A fixed slice of each source's val split: num_batches batches of up to batch_size windows per rank
    (fewer where a small source's split holds less); sources without a val split are left out, said once."""
    from .stream import eval_batches, open_split

    out = {}
    for name in names:
        val = open_split(shards_dir, "val", tokenizer, verify, required=False, source=name)
        available = 0 if val is None else max(0, (val.num_tokens - 1) // seq_len)
        if available < world:
            log.warning("eval: source %s has no validation split of %d windows (one per rank): no val_loss/%s "
                        "(raise data.val_fraction)", name, world, name)
            continue
        out[name] = eval_batches(val, seq_len, min(batch_size, available // world), num_batches, rank, world,
                                 document_mask=document_mask)
    return out
