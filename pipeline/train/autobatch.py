"""`micro_batch_size=auto`: the largest micro batch that fits in memory, found by a short probe before training.

Candidates are the divisors of global_batch_size / data-parallel ranks, so gradient accumulation stays a
whole number. A probe is one forward and backward of a replica of the model (training precision, activation
checkpointing as configured, not compiled) on random tokens of seq_len; what it measures, plus an estimate of
what it does not hold (fp32 master weights, Adam's moments and fp32 gradient buffers, divided as the ZeRO
stage divides them), is what that micro batch needs. The budget is `auto_memory_fraction` of the device's
memory: CUDA: this process's share of the GPU (free + already reserved by it); CPU: the RAM available now
(MemAvailable, capped by the cgroup limit) split between this node's ranks.

What a probe measures:
  CUDA  torch.cuda.max_memory_allocated over forward and backward (the replica's weights included); an
        OutOfMemoryError means "does not fit".
  CPU   there is no out-of-memory signal: the peak resident set size over forward and backward (sampled from
        /proc every millisecond and at the end of each, with glibc's free memory returned to the system
        first) above the level before it, plus the replica's own weights.

Memory is affine in the micro batch (activations grow with it; weights and optimizer state do not): after a
warm-up, two probes at the smallest candidates give a line, the largest candidate under the budget on that
line is probed for real, and the line is refitted through the two largest measured points, stepping down when
a probe does not fit and up while the refit allows (on the CPU never past what proportional growth from a
fitting probe says could exceed the RAM itself: see `search`). The replica holds full weights and gradients even under ZeRO 2/3 (an
overestimate), and DeepSpeed's communication buckets and the loaders' buffers are not counted (the headroom
left by auto_memory_fraction covers them). Every rank probes its own device; all take the smallest choice.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist

from ..config import DeepSpeedConfig, ModelConfig, PrecisionConfig, TrainConfig, stage_of
from ..data.batching import AUTO, BatchLayout
from ..errors import PipelineError

log = logging.getLogger(__name__)

MAX_PROBES = 8  # each is one forward and backward; the line converges in two or three
GIB = 2**30


def unprobed_bytes(n_params: int, precision: str, ds: DeepSpeedConfig, world_size: int, device_type: str) -> int:
    """Memory per rank that training holds and the probe does not: Adam's two fp32 moments and, in bf16/fp16,
    the fp32 master weights (ZeRO 1+ partitions both), plus the fp32 gradient accumulation buffer DeepSpeed
    keeps in bf16 under ZeRO (partitioned from stage 2). An optimizer offloaded to the CPU holds no GPU memory."""
    optimizer = (8 + (4 if precision in ("bf16", "fp16") else 0)) * n_params
    if ds.stage >= 1:
        optimizer //= world_size
    if ds.offload_optimizer and device_type == "cuda":
        optimizer = 0
    grad_accum = 0
    if precision == "bf16" and ds.stage >= 1:
        grad_accum = 4 * n_params // (world_size if ds.stage >= 2 else 1)
    return optimizer + grad_accum


# -- budget --------------------------------------------------------------------------------------------------
def available_ram() -> int:
    """Bytes of RAM this process could still take: MemAvailable, capped by a cgroup v2 (containers) limit."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def memory_budget(device: torch.device, fraction: float, local_ranks: int) -> tuple[int, str]:
    """(bytes, how they were found) that one rank may fill."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        usable = min(total, free + torch.cuda.memory_reserved(device))  # other processes' share is not ours
        return int(fraction * usable), f"{fraction:g} of {usable / GIB:.1f} GiB of {torch.cuda.get_device_name(device)}"
    ram = available_ram()
    return int(fraction * ram / local_ranks), (f"{fraction:g} of {ram / GIB:.1f} GiB available RAM"
                                               + (f" / {local_ranks} local ranks" if local_ranks > 1 else ""))


# -- measuring one probe ---------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    """Hand glibc's freed heap back to the system, so the next RSS baseline is not inflated by it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline is then higher and the measured delta smaller


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident set size above the level at start: a thread samples /proc/self/statm every millisecond
    (torch ops release the GIL), and `sample()` adds exact points at the ends of forward and backward."""

    def __init__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.sample()
        return self.peak - self.base


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))  # torch's CPU allocator


def probe(model: torch.nn.Module, micro_batch: int, seq_len: int, device: torch.device) -> int | None:
    """Bytes one forward and backward of `micro_batch` sequences needs on `device` (weights included), or
    None when it ran out of memory."""
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(micro_batch))
    inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    model.zero_grad(set_to_none=True)
    gc.collect()
    meter = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _malloc_trim()
        meter = RSSPeak()
    try:
        _, loss = model(inputs, labels)
        if meter is not None:
            meter.sample()  # activations are at their peak here
        loss.backward()
        if meter is not None:
            return meter.stop() + _model_bytes(model)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not _is_oom(exc):
            raise
        return None
    finally:
        if meter is not None:
            meter.stop()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- the search ------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    micro_batch: int  # 0: not even the smallest candidate fits
    candidates: list[int]
    budget: int
    extra: int  # unprobed_bytes: added to every probe
    budget_note: str = "given"  # how the budget was found
    world_size: int = 1
    measured: dict[int, int | None] = field(default_factory=dict)  # micro batch -> probe bytes (None: OOM)
    seconds: float = 0.0

    def need(self, micro_batch: int) -> int | None:
        probed = self.measured.get(micro_batch)
        return None if probed is None else probed + self.extra


def search(measure, cands: list[int], budget: int, extra: int, limit: int | None = None) -> Choice:
    """The largest of `cands` (ascending) whose measure(b) + extra <= budget; measure(b) returns bytes, or None
    for out of memory. A line through the two largest measured points predicts the next candidate to probe.

    With `limit` (CPU, where a probe too large is not an exception but the kernel's OOM killer) no candidate is
    probed whose need could exceed it: memory affine in b with a non-negative intercept gives
    need(c) <= need(b) * c / b for c > b, so that bound, from the largest fitting b, holds however noisy the line."""
    choice = Choice(0, cands, budget, extra)
    started = time.perf_counter()

    def fits(b: int) -> bool:
        if b not in choice.measured:
            choice.measured[b] = measure(b)
        need = choice.need(b)
        return need is not None and need <= budget

    try:
        if not fits(cands[0]):
            return choice
        best, ceiling = cands[0], None  # largest that fits; smallest known not to
        if len(cands) > 1:
            if fits(cands[1]):
                best = cands[1]
            else:
                ceiling = cands[1]
        while len(choice.measured) < MAX_PROBES:
            points = sorted((b, n) for b, n in choice.measured.items() if n is not None)[-2:]
            if len(points) < 2:  # one candidate, or the second ran out of memory
                break
            (b1, n1), (b2, n2) = points
            slope = max((n2 - n1) / (b2 - b1), 1.0)  # noise can make it flat or negative: it still grows
            bound = choice.need(best) / best
            under = [b for b in cands if best < b and (ceiling is None or b < ceiling)
                     and n2 + slope * (b - b2) + extra <= budget and (limit is None or bound * b <= limit)]
            if not under:
                break
            if fits(under[-1]):
                best = under[-1]
            else:
                ceiling = under[-1]
        choice.micro_batch = best
        return choice
    finally:
        choice.seconds = time.perf_counter() - started


def probe_model(model_cfg: ModelConfig, precision: str, device: torch.device) -> torch.nn.Module:
    """A replica as DeepSpeed will run it: parameters in the training precision (buffers stay fp32), on device."""
    from .model import Transformer

    model = Transformer(model_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None:
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model.to(device).train()


def choose_micro_batch(train: TrainConfig, key: str, model_cfg: ModelConfig, ds: DeepSpeedConfig,
                       precision: PrecisionConfig, device: torch.device, budget: int | None = None) -> Choice:
    """Probe on every rank (collective: all ranks call it), agree on the smallest fitting micro batch.
    `budget` (bytes per rank) replaces the one from auto_memory_fraction (tests)."""
    from ..cluster.distributed import LaunchInfo
    from .model import num_params

    started = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1
    cands = BatchLayout.micro_batch_choices(train, key, world)
    note = "given"
    if budget is None:
        budget, note = memory_budget(device, train.auto_memory_fraction, LaunchInfo.from_env().local_world_size)
    budget = _all_min(budget, device)  # the same budget everywhere: ranks then differ only by what they measure
    extra = unprobed_bytes(num_params(model_cfg, exclude_embedding=False), precision.name, ds, world, device.type)
    # the probe's random weights and tokens must not move the run's RNG streams
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = measure = None
        try:
            model = probe_model(model_cfg, precision.name, device)
            measure = partial(probe, model, seq_len=train.seq_len, device=device)
            measure(cands[0])  # warm-up: one-time allocations (thread pools, kernel workspaces) are not per batch
            # CPU: never probe past the RAM there is (the budget is a fraction of it); CUDA: OOM is caught
            limit = None if device.type == "cuda" else int(budget / train.auto_memory_fraction)
            choice = search(measure, cands, budget, extra, limit)
        except RuntimeError as exc:  # the replica itself does not fit; the other ranks must still agree
            if not _is_oom(exc):
                raise
            choice = Choice(0, cands, budget, extra)
        finally:
            del model, measure  # the replica's memory goes back before the real model is built
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            else:
                _malloc_trim()
    choice.micro_batch = _all_min(choice.micro_batch, device)
    choice.budget_note, choice.world_size = note, world
    choice.seconds = time.perf_counter() - started  # the replica, the warm-up and every probe
    return choice


def _all_min(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def resolve(train: TrainConfig, key: str, model_cfg: ModelConfig, ds: DeepSpeedConfig, precision: PrecisionConfig,
            device: torch.device) -> TrainConfig:
    """`train` with micro_batch_size=auto replaced by the probed choice (as is otherwise)."""
    if train.micro_batch_size != AUTO:
        return train
    choice = choose_micro_batch(train, key, model_cfg, ds, precision, device)
    probes = ", ".join(f"{b}: {'out of memory' if n is None else _size(n + choice.extra)}"
                       for b, n in sorted(choice.measured.items())) or "the model itself did not fit"
    if choice.micro_batch == 0:
        zero3 = ("; the probe holds a whole replica, which ZeRO 3 would not: give "
                 f"{key}.micro_batch_size as a number") if ds.stage == 3 else ""
        raise PipelineError(f"{key}.micro_batch_size=auto: not even a micro batch of {choice.candidates[0]} fits "
                            f"in {_size(choice.budget)} per rank ({key}.auto_memory_fraction="
                            f"{train.auto_memory_fraction:g}; needed by micro batch: {probes}): lower "
                            f"{key}.seq_len, set model.activation_checkpointing=true or a higher ZeRO stage, or "
                            f"raise {key}.auto_memory_fraction{zero3}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("%s: %s.micro_batch_size=auto: %d of %s (gradient accumulation %d), %.1f s of probes; budget %s "
                 "per rank (%s); rank 0 needs by micro batch %s, of which %s optimizer state (estimated, not "
                 "probed)", stage_of(key), key, choice.micro_batch,
                 ",".join(map(str, choice.candidates)),
                 BatchLayout(train.global_batch_size, choice.micro_batch, choice.world_size).accumulation,
                 choice.seconds, _size(choice.budget), choice.budget_note, probes, _size(choice.extra))
    return replace(train, micro_batch_size=choice.micro_batch)
