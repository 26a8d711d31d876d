"""Pretraining data: the shards of one split as one token stream, cut into fixed windows, in a seeded order.

Stream: a split's documents (each already ends with EOS) concatenated in manifest order, read straight
from the memory-mapped shards; a window may span two shard files. Sample i is the `seq_len + 1`
tokens starting at i * seq_len (inputs = the first seq_len, labels = the last seq_len).

Order: `batching.GlobalOrder` (a seeded permutation per epoch, chained; step k consumes positions
[k*G, (k+1)*G)); data-parallel rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of each step, so the
global batch depends only on (data, seq_len, seed, G), not on the number of ranks or the micro batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..config import VERIFY_MODES
from ..errors import PipelineError
from ..fsutil import sha256_file
from ..layout import MANIFEST
from .batching import BatchLayout, FixedBatches, GlobalOrder
from .indexed import IndexedDataset

log = logging.getLogger(__name__)

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


def document_segments(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Segment ids for windows of token ids [B, T]: 0 up to and including the first EOS, then 1, ...
    An EOS belongs to the document it ends, so each document is attended exactly as if it ran alone."""
    ends = inputs[:, :-1] == eos_id
    segments = np.zeros(inputs.shape, np.int64)
    np.cumsum(ends, axis=1, out=segments[:, 1:])
    return segments



def source_bodies(manifest: dict) -> dict[str, dict]:
    """The manifest's sources by name, each {"splits", "folder"[, "external"]}: `sources` (format version 2),
    or the whole manifest as the one source `corpus` (version 1 and hand-written manifests)."""
    if "sources" in manifest:
        return {name: {"folder": name, **body} for name, body in manifest["sources"].items()}
    return {"corpus": {"folder": ".", "splits": manifest["splits"]}}


def manifest_sources(shards_dir: Path) -> list[str]:
    """The source names of the manifest in `shards_dir` (sorted)."""
    return sorted(source_bodies(_read_manifest(Path(shards_dir) / MANIFEST)))


def _read_manifest(manifest_path: Path) -> dict:
    if not manifest_path.is_file():
        raise PipelineError(f"{manifest_path} does not exist: run stages=[shard] first (or fix run_dir)")
    try:
        return json.loads(manifest_path.read_text())
    except ValueError as e:
        raise PipelineError(f"{manifest_path} is unreadable ({e!r}): rerun stages=[shard]") from None


def open_split(shards_dir: Path, split: str, tokenizer_path: Path, verify: str = "full",
               required: bool = True, source: str | None = None) -> TokenStream | None:
    """Open `split` of one source of `shards_dir` (None: the manifest's only source) after checking it against
    its manifest and the tokenizer. With required=False a split without any token (e.g. val with
    data.val_fraction=0) gives None.

    verify: "full" hashes every .bin/.idx and checks every token id < vocab_size (reads all the data once);
    "size" compares file sizes only; "off" trusts the files (the reader still validates their format).
    """
    shards_dir, tokenizer_path = Path(shards_dir), Path(tokenizer_path)
    if verify not in VERIFY_MODES:
        raise PipelineError(f"data verify mode {verify!r} is unknown: use one of {', '.join(VERIFY_MODES)}")
    manifest_path = shards_dir / MANIFEST
    manifest = _read_manifest(manifest_path)
    try:
        bodies = source_bodies(manifest)
        if source is None and len(bodies) != 1:
            raise PipelineError(f"{manifest_path} holds the sources {sorted(bodies)}: name one")
        body = bodies[source if source is not None else next(iter(bodies))]
        if not required and not sum(i["num_tokens"] for i in body["splits"].get(split, {}).get("shards", [])):
            return None
        shard_list = body["splits"][split]["shards"]
        vocab_size, eos_id = int(manifest["vocab_size"]), int(manifest["eos_id"])
        dtype = np.dtype(body.get("dtype", manifest["dtype"])).newbyteorder("<")  # shards are little-endian
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{manifest_path} is unreadable or has no split {split!r} of source {source!r} ({e!r}): "
                            f"rerun stages=[shard]") from None
    if not tokenizer_path.is_file():
        raise PipelineError(f"tokenizer {tokenizer_path} does not exist: run stages=[tokenize] or fix tokenizer.path")
    if sha256_file(tokenizer_path) != manifest.get("tokenizer_sha256"):
        raise PipelineError(f"{manifest_path}: shards were written with another tokenizer than {tokenizer_path}: "
                            f"rerun stages=[shard] or point tokenizer.path at the tokenizer they were written with")
    folder = shards_dir / body["folder"] / split
    datasets = [_open_shard(Path(info["prefix"]) if body.get("external") else folder / info["prefix"], info,
                            manifest_path, verify, vocab_size, dtype) for info in shard_list]
    digest = hashlib.sha256("".join(i["bin_sha256"] + i["idx_sha256"] for i in shard_list).encode()).hexdigest()
    fingerprint = {"split": split, "num_tokens": sum(ds.num_tokens for ds in datasets), "shards_sha256": digest}
    return TokenStream(datasets, vocab_size, eos_id, fingerprint)


def _open_shard(prefix: Path, info: dict, manifest_path: Path, verify: str, vocab_size: int,
                dtype: np.dtype) -> IndexedDataset:
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


def _to_batch(windows: np.ndarray, pin_memory: bool, eos_id: int | None = None) -> Batch:
    """Windows [b, seq_len + 1] -> contiguous int64 (inputs, labels), each [b, seq_len]; with eos_id
    (train.document_mask), also each input's document within its window (document_segments)."""
    b, length = windows.shape
    inputs, labels = _alloc((b, length - 1), pin_memory), _alloc((b, length - 1), pin_memory)
    np.copyto(inputs.numpy(), windows[:, :-1], casting="unsafe")  # unsigned/int32 -> int64 widening
    np.copyto(labels.numpy(), windows[:, 1:], casting="unsafe")
    if eos_id is None:
        return inputs, labels
    segments = _alloc((b, length - 1), pin_memory)
    segments.numpy()[:] = document_segments(windows[:, :-1], eos_id)
    return inputs, labels, segments


def _check_pin(pin_memory: bool) -> None:
    if pin_memory and not torch.cuda.is_available():
        raise PipelineError("pin_memory=True needs a CUDA device; none is available (set it only for GPU training)")


def check_resume_settings(state: dict, mine: dict) -> None:
    """A loader resumes only with the seq_len, global batch and seed its checkpoint was written with."""
    for key in ("seq_len", "global_batch_size", "seed"):
        if state.get(key) != mine[key]:
            raise PipelineError(f"refusing to resume: {key} is {mine[key]} but the checkpoint was written with "
                                f"{state.get(key)}: set it back or start a new run")


def check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise PipelineError(f"bad data-parallel layout: dp_rank={rank}, dp_world={world}")


class PretrainLoader:
    """Train batches: each `next_global_batch()` is one optimizer step's data for this rank."""

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, pin_memory: bool = False,
                 document_mask: bool = False):
        self.num_samples = num_windows(stream, seq_len)
        check_rank(dp_rank, dp_world)
        self.layout = BatchLayout(global_batch_size, micro_batch_size, dp_world, "train")
        _check_pin(pin_memory)
        self.stream, self.seq_len, self.dp_rank, self.pin_memory = stream, seq_len, dp_rank, pin_memory
        self.order = GlobalOrder(self.num_samples, self.layout, seed)
        self._windows = np.empty((micro_batch_size, seq_len + 1), stream.dtype)
        self.eos_id = stream.eos_id if document_mask else None  # batches carry document segments

    def next_global_batch(self) -> list[Batch]:
        """This rank's micro batches (inputs, labels[, segments]) of the next optimizer step."""
        batches = []
        for micro in self.order.rank_ids(self.order.samples_consumed, self.dp_rank):
            self.stream.gather_windows(micro * self.seq_len, self._windows)
            batches.append(_to_batch(self._windows, self.pin_memory, self.eos_id))
        self.order.advance()  # only once the whole step's data exists
        return batches

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "seq_len": self.seq_len, "fingerprint": dict(self.stream.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. The rank count and micro batch may differ from the
        checkpoint's (the global batches do not depend on them); data, seq_len, seed and global batch may not."""
        mine = self.state_dict()
        if state.get("fingerprint") != mine["fingerprint"]:
            raise PipelineError(f"refusing to resume: the shards changed since the checkpoint "
                                f"(checkpoint {state.get('fingerprint')}, now {mine['fingerprint']}): "
                                f"restore the original shards or start a new run")
        check_resume_settings(state, mine)
        self.order.load_samples_consumed(state.get("samples_consumed"))


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, num_batches: int | None = None,
                 dp_rank: int = 0, dp_world: int = 1, pin_memory: bool = False,
                 document_mask: bool = False) -> FixedBatches:
    """Validation batches: the first num_batches × batch_size × dp_world windows of the split, in order
    (batch_size is per rank: the micro batch); None: every whole batch the split holds. document_mask: the
    batches carry document segments, as PretrainLoader's do."""
    available = num_windows(stream, seq_len)
    split = stream.fingerprint["split"]
    if available < batch_size * dp_world:
        raise PipelineError(f"the {split} split has {available} windows of {seq_len + 1} tokens, fewer than one eval "
                            f"batch of {batch_size} × {dp_world} ranks: lower train.micro_batch_size or "
                            f"train.seq_len, or raise data.val_fraction")
    _check_pin(pin_memory)
    windows = np.empty((batch_size, seq_len + 1), stream.dtype)

    def make_batch(ids: np.ndarray) -> Batch:
        stream.gather_windows(ids * seq_len, windows)
        return _to_batch(windows, pin_memory, stream.eos_id if document_mask else None)

    batches = FixedBatches(available, batch_size, available if num_batches is None else num_batches, dp_rank,
                           dp_world, make_batch)
    if num_batches is not None and num_batches > batches.full:
        log.warning("eval: the %s split holds only %d batches of %d × %d windows (asked for %d)", split,
                    batches.full, batch_size, dp_world, num_batches)
    return batches
