"""Pretraining data: the shards of one split as one token stream, cut into fixed windows, in a seeded order.

Stream: a split's documents (each already ends with EOS) concatenated in manifest order, read straight
from the memory-mapped shards; a window may span two shard files. Sample i is the `seq_len + 1`
tokens starting at i * seq_len (inputs = the first seq_len, labels = the last seq_len).

Order: epoch e visits the samples in `default_rng([seed, e]).permutation(num_samples)`; the epochs are
chained into one endless sequence of positions, and optimizer step k consumes positions
[k*G, (k+1)*G) (G = global batch). Data-parallel rank r takes the contiguous slice [r*G/W, (r+1)*G/W)
of it. Every rank computes the same order, so the global batch depends only on (data, seq_len, seed, G):
not on the number of ranks or the micro batch size. Resuming needs one number, `samples_consumed`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import PipelineError
from .fsutil import sha256_file
from .indexed import IndexedDataset

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERIFY_MODES = ("full", "size", "off")
Batch = tuple[torch.Tensor, ...]  # (inputs, labels[, segments]), int64 [batch, seq_len]


class TokenStream:
    """One split's shards as one read-only virtual token array (memory-mapped, never loaded whole)."""

    def __init__(self, shards: list[IndexedDataset], vocab_size: int, eos_id: int, fingerprint: dict):
        self._tokens = [ds.tokens for ds in shards if ds.num_tokens]  # zero-copy views of the .bin files
        self._starts = np.cumsum([0] + [t.size for t in self._tokens], dtype=np.int64)  # len = shards + 1
        self._shards = shards  # keeps the mmaps open
        self.num_tokens = int(self._starts[-1])
        self.dtype = shards[0].dtype if shards else np.dtype("<u2")
        self.vocab_size, self.eos_id, self.fingerprint = vocab_size, eos_id, fingerprint

    def read(self, start: int, length: int) -> np.ndarray:
        """A copy of tokens [start, start + length), in the shards' dtype."""
        out = np.empty(length, self.dtype)
        self.read_into(start, out)
        return out

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill the 1-D `out` with tokens [start, start + len(out)), crossing shard files as needed."""
        if start < 0 or start + out.size > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + out.size}) out of range for {self.num_tokens} tokens")
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < out.size:
            tokens, offset = self._tokens[shard], start + done - int(self._starts[shard])
            n = min(out.size - done, tokens.size - offset)
            out[done:done + n] = tokens[offset:offset + n]
            done, shard = done + n, shard + 1

    def gather_windows(self, starts: np.ndarray, out: np.ndarray) -> None:
        """out[j] = tokens [starts[j], starts[j] + out.shape[1]): one slice copy per window, no per-token work."""
        length = out.shape[1]
        shards = np.searchsorted(self._starts, starts, side="right") - 1
        within = starts + length <= self._starts[shards + 1]  # the common case: the window lies in one file
        for j, (start, shard, inside) in enumerate(zip(starts.tolist(), shards.tolist(), within.tolist())):
            if inside:
                offset = start - int(self._starts[shard])
                out[j] = self._tokens[shard][offset:offset + length]
            else:
                self.read_into(start, out[j])


def open_split(shards_dir: Path, split: str, tokenizer_path: Path, verify: str = "full",
               required: bool = True) -> TokenStream | None:
    """Open `shards_dir`/`split` after checking it against its manifest and the tokenizer.
    With required=False a split without any token (e.g. val with data.val_fraction=0) gives None.

    verify: "full" hashes every .bin/.idx and checks every token id < vocab_size (reads all the data once);
    "size" compares file sizes only; "off" trusts the files (the reader still validates their format).
    """
    shards_dir, tokenizer_path = Path(shards_dir), Path(tokenizer_path)
    if verify not in VERIFY_MODES:
        raise PipelineError(f"data verify mode {verify!r} is unknown: use one of {', '.join(VERIFY_MODES)}")
    manifest_path = shards_dir / MANIFEST
    if not manifest_path.is_file():
        raise PipelineError(f"{manifest_path} does not exist: run stages=[shard] first (or fix run_dir)")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not required and not sum(i["num_tokens"] for i in manifest["splits"].get(split, {}).get("shards", [])):
            return None
        shard_list = manifest["splits"][split]["shards"]
        vocab_size, eos_id = int(manifest["vocab_size"]), int(manifest["eos_id"])
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # shards are little-endian
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{manifest_path} is unreadable or has no split {split!r} ({e!r}): "
                            f"rerun stages=[shard]") from None
    if not tokenizer_path.is_file():
        raise PipelineError(f"tokenizer {tokenizer_path} does not exist: run stages=[tokenize] or fix tokenizer.path")
    if sha256_file(tokenizer_path) != manifest.get("tokenizer_sha256"):
        raise PipelineError(f"{manifest_path}: shards were written with another tokenizer than {tokenizer_path}: "
                            f"rerun stages=[shard] or point tokenizer.path at the tokenizer they were written with")
    datasets = [_open_shard(shards_dir / split, info, manifest_path, verify, vocab_size, dtype) for info in shard_list]
    digest = hashlib.sha256("".join(i["bin_sha256"] + i["idx_sha256"] for i in shard_list).encode()).hexdigest()
    fingerprint = {"split": split, "num_tokens": sum(ds.num_tokens for ds in datasets), "shards_sha256": digest}
    return TokenStream(datasets, vocab_size, eos_id, fingerprint)


def _open_shard(folder: Path, info: dict, manifest_path: Path, verify: str, vocab_size: int,
                dtype: np.dtype) -> IndexedDataset:
    prefix = folder / info["prefix"]
    paths = {kind: Path(f"{prefix}.{kind}") for kind in ("bin", "idx")}
    for path in paths.values():
        if not path.is_file():
            raise PipelineError(f"{path} (listed in {manifest_path}) is missing: rerun stages=[shard]")
    if verify in ("size", "full"):
        for kind, path in paths.items():
            if path.stat().st_size != info[f"{kind}_bytes"]:
                raise PipelineError(f"{path} is {path.stat().st_size} bytes but {manifest_path} says "
                                    f"{info[f'{kind}_bytes']} (truncated or rewritten): rerun stages=[shard]")
    if verify == "full":  # before the reader, so a corrupt file is reported as such
        bin_sha, (low, high) = _scan_bin(paths["bin"], dtype)
        for kind, sha in (("idx", sha256_file(paths["idx"])), ("bin", bin_sha)):
            if sha != info[f"{kind}_sha256"]:
                raise PipelineError(f"{paths[kind]}: sha256 differs from {manifest_path} (corrupt or rewritten): "
                                    f"rerun stages=[shard]")
        if low < 0 or high >= vocab_size:
            raise PipelineError(f"{paths['bin']} holds token ids in [{low}, {high}], outside the vocabulary "
                                f"[0, {vocab_size}) of {manifest_path}: rerun stages=[shard]")
    try:
        ds = IndexedDataset(prefix)
    except ValueError as e:
        raise PipelineError(f"{e}: rerun stages=[shard]") from None
    if ds.dtype != dtype or ds.num_tokens != info["num_tokens"]:
        raise PipelineError(f"{paths['bin']} holds {ds.num_tokens} {ds.dtype.name} tokens but {manifest_path} "
                            f"says {info['num_tokens']} {dtype.name}: rerun stages=[shard]")
    return ds


def _scan_bin(path: Path, dtype: np.dtype, chunk: int = 1 << 24) -> tuple[str, tuple[int, int]]:
    """sha256 and (min, max) token id of a .bin in one read; chunk is a multiple of every itemsize."""
    digest, lows, highs = hashlib.sha256(), [], []
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            tokens = np.frombuffer(block, dtype)
            lows.append(int(tokens.min()))
            highs.append(int(tokens.max()))
    return digest.hexdigest(), (min(lows, default=0), max(highs, default=0))


def num_windows(stream: TokenStream, seq_len: int) -> int:
    """How many `seq_len + 1` windows start at multiples of seq_len; PipelineError if not even one."""
    if seq_len < 1:
        raise PipelineError(f"seq_len={seq_len} must be positive")
    n = (stream.num_tokens - 1) // seq_len
    if n < 1:
        raise PipelineError(f"the {stream.fingerprint['split']} split has {stream.num_tokens} tokens, too few for one "
                            f"window of seq_len + 1 = {seq_len + 1}: add data or lower seq_len")
    return n


def _alloc(shape: tuple[int, ...], pin_memory: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory)


def _to_batch(windows: np.ndarray, pin_memory: bool) -> Batch:
    """Windows [b, seq_len + 1] -> contiguous int64 (inputs, labels), each [b, seq_len]."""
    b, length = windows.shape
    inputs, labels = _alloc((b, length - 1), pin_memory), _alloc((b, length - 1), pin_memory)
    np.copyto(inputs.numpy(), windows[:, :-1], casting="unsafe")  # unsigned/int32 -> int64 widening
    np.copyto(labels.numpy(), windows[:, 1:], casting="unsafe")
    return inputs, labels


def _check_pin(pin_memory: bool) -> None:
    if pin_memory and not torch.cuda.is_available():
        raise PipelineError("pin_memory=True needs a CUDA device; none is available (set it only for GPU training)")


class PretrainLoader:
    """Train batches: each `next_global_batch()` is one optimizer step's data for this rank."""

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, pin_memory: bool = False):
        self.num_samples = num_windows(stream, seq_len)
        if micro_batch_size < 1 or dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise PipelineError(f"bad data-parallel layout: micro_batch_size={micro_batch_size}, "
                                f"dp_rank={dp_rank}, dp_world={dp_world}")
        per_step = micro_batch_size * dp_world
        if global_batch_size < 1 or global_batch_size % per_step:
            raise PipelineError(f"train.global_batch_size={global_batch_size} is not a multiple of micro_batch_size "
                                f"× data-parallel size = {micro_batch_size} × {dp_world} = {per_step}: change one")
        _check_pin(pin_memory)
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_world, self.pin_memory = dp_rank, dp_world, pin_memory
        self.grad_accum = global_batch_size // per_step
        self.samples_consumed = 0  # global: positions of the epoch-chained order used by all ranks so far
        self._perms: dict[int, np.ndarray] = {}
        self._windows = np.empty((micro_batch_size, seq_len + 1), stream.dtype)

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
        for epoch in np.unique(epochs).tolist():  # one or two epochs per batch, unless the split is tiny
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[offsets[mask]]
        return out

    def next_global_batch(self) -> list[Batch]:
        """This rank's grad_accum micro batches (inputs, labels) of the next optimizer step."""
        per_rank = self.global_batch_size // self.dp_world
        first = self.samples_consumed + self.dp_rank * per_rank
        ids = self.sample_ids(first, first + per_rank)
        batches = []
        for micro in ids.reshape(self.grad_accum, self.micro_batch_size):
            self.stream.gather_windows(micro * self.seq_len, self._windows)
            batches.append(_to_batch(self._windows, self.pin_memory))
        self.samples_consumed += self.global_batch_size  # only once the whole step's data exists
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "epoch": self.epoch, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                "fingerprint": dict(self.stream.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. dp_world and micro_batch_size may differ from the
        checkpoint's (the global batches do not depend on them); data, seq_len, seed and global batch may not."""
        mine = self.state_dict()
        if state.get("fingerprint") != mine["fingerprint"]:
            raise PipelineError(f"refusing to resume: the shards changed since the checkpoint "
                                f"(checkpoint {state.get('fingerprint')}, now {mine['fingerprint']}): "
                                f"restore the original shards or start a new run")
        for key in ("seq_len", "global_batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise PipelineError(f"refusing to resume: {key} is {mine[key]} but the checkpoint was written with "
                                    f"{state.get(key)}: set it back or start a new run")
        consumed = state.get("samples_consumed")
        if not isinstance(consumed, int) or consumed < 0 or consumed % self.global_batch_size:
            raise PipelineError(f"refusing to resume: samples_consumed={consumed!r} in the checkpoint is not a "
                                f"multiple of global_batch_size={self.global_batch_size}")
        self.samples_consumed = consumed


class EvalBatches:
    """Validation batches: the first num_batches × batch_size × dp_world windows, in order. batch_size is per
    rank (the micro batch): batch b is windows [b*B*W, (b+1)*B*W) and rank r takes [b*B*W + r*B, +B) of it.
    Iterating again gives the same batches."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, num_batches: int | None = None,
                 dp_rank: int = 0, dp_world: int = 1, pin_memory: bool = False):
        available = num_windows(stream, seq_len)
        if batch_size < 1 or dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise PipelineError(f"bad eval layout: batch_size={batch_size}, dp_rank={dp_rank}, dp_world={dp_world}")
        per_batch = batch_size * dp_world
        if available < per_batch:
            raise PipelineError(f"the {stream.fingerprint['split']} split has {available} windows of "
                                f"{seq_len + 1} tokens, fewer than one eval batch of {batch_size} × {dp_world} ranks: "
                                f"lower train.micro_batch_size or train.seq_len, or raise data.val_fraction")
        full = available // per_batch
        if num_batches is not None and num_batches > full:
            log.warning("eval: the %s split holds only %d batches of %d × %d windows (asked for %d)",
                        stream.fingerprint["split"], full, batch_size, dp_world, num_batches)
        _check_pin(pin_memory)
        self.num_batches = full if num_batches is None else max(0, min(num_batches, full))
        self.stream, self.seq_len, self.batch_size, self.pin_memory = stream, seq_len, batch_size, pin_memory
        self.dp_rank, self.dp_world = dp_rank, dp_world

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        windows = np.empty((self.batch_size, self.seq_len + 1), self.stream.dtype)
        for b in range(self.num_batches):
            first = (b * self.dp_world + self.dp_rank) * self.batch_size
            self.stream.gather_windows(np.arange(first, first + self.batch_size, dtype=np.int64) * self.seq_len,
                                       windows)
            yield _to_batch(windows, self.pin_memory)
