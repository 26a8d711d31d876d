"""`shard` stage: encode the corpus and write Megatron/GPT-NeoX MMIDIDX token shards.

Speed: SentencePiece's batch encode runs on all cores with the GIL released, while this thread
reads the next batch and writes the previous one. Memory: at most three batches of `shard.batch_mb`.
Determinism: documents keep corpus order and shards roll over at document boundaries by size, so the
bytes on disk depend on neither the thread count nor the batch size.
Crash safety: everything is written into `shards.tmp/`, the manifest last, and the folder is renamed
to `shards/` only when complete. Jobs that each write one part (`shard.num_workers`) publish
`shards.parts/wNNN/`, and a merge step links the parts into `shards/` with one manifest.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..config import DataConfig, ShardConfig
from ..data.corpus import Corpus, DocumentBatch
from ..data.indexed import IndexedDatasetWriter, ShardInfo, token_dtype
from ..data.shard_sources import reference_shards
from ..data.vocab import load_tokenizer
from ..errors import PipelineError
from ..fsutil import atomic_write_json, fsync_dir, no_space, replace_dir, sha256_file
from ..layout import MANIFEST, RunLayout
from .context import Context

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
PART_MANIFEST = "part.json"


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    if not ctx.layout.tokenizer.is_file():
        raise PipelineError(f"no tokenizer at {ctx.layout.tokenizer}: run stages=[tokenize,shard] "
                            f"or set tokenizer.path= with stage tokenize")
    shard = {k: v for k, v in asdict(ctx.cfg.shard).items() if k not in ("encode_threads", "batch_mb")}
    # the weights and phases decide nothing here (the blend happens in pretrain)
    data = {k: v for k, v in asdict(ctx.cfg.data).items() if k not in ("max_repetitions", "phases")}
    data["sources"] = {n: {k: v for k, v in s.items() if k != "weight"} for n, s in data["sources"].items()}
    return {"tokenizer_sha256": sha256_file(ctx.layout.tokenizer), "data": data,
            "corpus": ctx.corpus_identity(), "shard": shard}


def run(ctx: Context) -> list[Path]:
    """This job's share: the whole stage, one part (shard.worker_index), or the merge of the parts."""
    layout, shard = ctx.layout, ctx.cfg.shard
    try:
        manifest = shard_corpus(ctx, shard, ctx.cfg.data, layout)
    except OSError as exc:
        full = no_space(exc, layout.shards.parent)
        if not full:
            raise
        raise PipelineError(f"shard: {full}; the unfinished shards were removed (an earlier shards/ is unchanged): "
                            f"free space there or set run_dir on a larger disk, then rerun the same command") from exc
    if shard.worker_index is not None and shard.num_workers > 1:  # a part: the merge consumes it
        return [part_dir(layout, shard.worker_index) / PART_MANIFEST]
    files = [layout.manifest]
    for name, source in manifest["sources"].items():
        if source.get("external"):  # referenced in place: not this stage's output
            continue
        for split, body in source["splits"].items():
            folder = layout.shards / source.get("folder", name) / split
            files += [folder / (info["prefix"] + suffix) for info in body["shards"] for suffix in (".bin", ".idx")]
    return files


def part_dir(layout: RunLayout, index: int) -> Path:
    return layout.shard_parts / f"w{index:03d}"


def is_validation(indices: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Seeded per-document split (splitmix64 of the document's corpus index): independent of batching
    and of how many jobs share the corpus."""
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point of the hash
        x = indices.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class SplitWriter:
    """Writes one split as numbered shards, starting a new one once a shard reaches `shard_bytes`."""

    def __init__(self, folder: Path, name_prefix: str, dtype: np.dtype, shard_bytes: int):
        self.folder, self.name_prefix, self.dtype, self.shard_bytes = folder, name_prefix, dtype, shard_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._writer: IndexedDatasetWriter | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        while len(lengths):
            if self._writer is None:
                name = f"{self.name_prefix}{len(self.shards):05d}"
                self._writer = IndexedDatasetWriter(self.folder / name, self.dtype)
            ends = self._writer.bin_bytes + np.cumsum(lengths) * self.dtype.itemsize
            full = np.flatnonzero(ends >= self.shard_bytes)
            take = int(full[0]) + 1 if len(full) else len(lengths)  # the document that fills it, inclusive
            num_tokens = int(lengths[:take].sum())
            self._writer.add_documents(tokens[:num_tokens], lengths[:take])
            tokens, lengths = tokens[num_tokens:], lengths[take:]
            if len(full):
                self._close_shard()

    def close(self) -> list[ShardInfo]:
        if self._writer is not None and self._writer.num_documents:
            self._close_shard()
        elif self._writer is not None:
            self._writer.abort()
        self._writer = None
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def _close_shard(self) -> None:
        self.shards.append(self._writer.finalize())
        self._writer = None


def encoded(sp, batches: Iterator[DocumentBatch], threads: int) -> Iterator[tuple[DocumentBatch, list]]:
    """Encode batch k on SentencePiece's threads while the caller reads k+1 and writes k-1.
    numpy output: no Python int per token (those are built one by one, holding the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(sp.encode, batch.texts, num_threads=threads, out_type="numpy")))
            if len(pending) > 1:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def flatten_with_eos(ids: list[np.ndarray], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One flat token array with EOS after every document, and each document's length (EOS included)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.insert(np.concatenate(ids).astype(dtype, copy=False), np.cumsum(lengths), np.array(eos, dtype=dtype))
    return flat, lengths + 1


def write_shards(corpus: Corpus, shard: ShardConfig, data: DataConfig, tokenizer_path: Path, out_dir: Path,
                 num_parts: int = 1, part: int = 0, name_prefix: str = "", source: str = "corpus") -> dict:
    """Encode this job's documents into `out_dir`/{train,val}; return the manifest body."""
    sp = load_tokenizer(tokenizer_path)
    vocab_size, eos = sp.get_piece_size(), sp.eos_id()
    dtype = token_dtype(vocab_size)
    threads = shard.encode_threads or os.cpu_count() or 1
    shard_bytes = max(1, int(shard.shard_size_mb * (1 << 20)))
    writers = {split: SplitWriter(out_dir / split, name_prefix, dtype, shard_bytes) for split in SPLITS}
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    started, total_tokens = time.perf_counter(), 0
    progress = tqdm(desc="shard", unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0)
    try:
        batches = corpus.batches(max(1, int(shard.batch_mb * (1 << 20))), num_parts=num_parts, part=part)
        for batch, ids in encoded(sp, batches, threads):
            tokens, lengths = flatten_with_eos(ids, eos, dtype)
            val_docs = is_validation(np.asarray(batch.indices), data.seed, data.val_fraction)
            val_tokens = np.repeat(val_docs, lengths)
            for split, doc_mask, token_mask in (("train", ~val_docs, ~val_tokens), ("val", val_docs, val_tokens)):
                if doc_mask.any():
                    writers[split].add(tokens[token_mask], lengths[doc_mask])
                    counts[split]["documents"] += int(doc_mask.sum())
                    counts[split]["tokens"] += int(lengths[doc_mask].sum())
            total_tokens += len(tokens)
            progress.update(corpus.stats.text_bytes - progress.n)
            progress.set_postfix_str(f"{total_tokens / (time.perf_counter() - started) / 1e6:.2f}M tok/s",
                                     refresh=False)
        shards = {split: [asdict(info) for info in writers[split].close()] for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    if corpus.stats.documents == 0:
        raise PipelineError(f"the corpus has no non-empty document (source {source}): check data.paths "
                            f"(data.sources.{source}.paths) and data.text_field")
    log.info("shard: source %s: %d documents (train %d, val %d), %d tokens, %d empty skipped, %d characters replaced; "
             "%.1f MB/s, %.2fM tokens/s", source, counts["train"]["documents"] + counts["val"]["documents"],
             counts["train"]["documents"], counts["val"]["documents"], total_tokens,
             corpus.stats.skipped_empty, corpus.stats.replaced_chars,
             corpus.stats.text_bytes / seconds / 1e6, total_tokens / seconds / 1e6)
    if data.val_fraction > 0 and counts["val"]["documents"] == 0:
        log.warning("shard: no document went to validation (data.val_fraction=%s); raise it", data.val_fraction)
    return {
        "format": "MMIDIDX", "format_version": 1,
        "tokenizer_sha256": sha256_file(tokenizer_path), "vocab_size": vocab_size, "dtype": dtype.name,
        "eos_id": eos, "bos_id": sp.bos_id(), "pad_id": sp.pad_id(),
        "val_fraction": data.val_fraction, "seed": data.seed,
        "splits": {split: {**counts[split], "shards": shards[split]} for split in SPLITS},
        "corpus": corpus.stats.as_dict(),  # what was read: the whole corpus, also for one part
    }


MANIFEST_HEADER = ("format", "tokenizer_sha256", "vocab_size", "dtype", "eos_id", "bos_id", "pad_id", "val_fraction",
                   "seed")


def write_sources(ctx: Context, shard: ShardConfig, data: DataConfig, out: Path, parts: tuple[int, int] | None,
                  text: bool = True, shards: bool = True) -> dict:
    """Every source into `out`/<source>/{train,val} (shards sources: checked and referenced); the manifest.
    `parts`: (num_parts, part) of this job's share of the text sources."""
    num_parts, part = parts or (1, 0)
    prefix = f"w{part:03d}-" if parts else ""
    sp = load_tokenizer(ctx.layout.tokenizer)
    header = {"format": "MMIDIDX", "format_version": 2, "tokenizer_sha256": sha256_file(ctx.layout.tokenizer),
              "vocab_size": sp.get_piece_size(), "dtype": token_dtype(sp.get_piece_size()).name,
              "eos_id": sp.eos_id(), "bos_id": sp.bos_id(), "pad_id": sp.pad_id(),
              "val_fraction": data.val_fraction, "seed": data.seed}
    sources = {}
    for name, source in ctx.sources.items():
        if source.shards and shards:
            sources[name] = reference_shards(name, source, sp.get_piece_size(), sp.eos_id(), out / name)
        elif not source.shards and text:
            folder = source_folder(name, ctx.sources)
            body = write_shards(ctx.source_corpus(name), shard, data, ctx.layout.tokenizer, out / folder, num_parts,
                                part, name_prefix=prefix, source=name)
            sources[name] = {"splits": body["splits"], "corpus": body["corpus"], "folder": folder}
    return {**header, "sources": sources}


def source_folder(name: str, sources: dict) -> str:
    """Where a text source's train/ and val/ go below shards/: its own folder in a mixture; shards/ itself
    for a run of one source (shards/train, shards/val: the layout of single-corpus runs and other tools)."""
    return "." if len(sources) == 1 else name


def shard_corpus(ctx: Context, shard: ShardConfig, data: DataConfig, layout: RunLayout) -> dict:
    """Run this job's share of the stage; returns the manifest once `shards/` is complete."""
    workers, index = shard.num_workers, shard.worker_index
    if workers == 1:
        staging = fresh_dir(layout.shards.with_name("shards.tmp"))
        with removed_on_error(staging):
            manifest = write_sources(ctx, shard, data, staging, None)
            atomic_write_json(staging / MANIFEST, manifest)
        replace_dir(staging, layout.shards)
        return manifest
    if index is None:
        return merge_parts(ctx, layout, workers)
    layout.shard_parts.mkdir(parents=True, exist_ok=True)
    final = part_dir(layout, index)
    staging = fresh_dir(final.with_name(final.name + ".tmp"))
    with removed_on_error(staging):
        manifest = write_sources(ctx, shard, data, staging, (workers, index), shards=False)
        atomic_write_json(staging / PART_MANIFEST, {**manifest, "part": index, "num_parts": workers})
    replace_dir(staging, final)
    return manifest


@contextmanager
def removed_on_error(staging: Path) -> Iterator[None]:
    """Bad input leaves no half-written staging folder (a killed run's is discarded by the next run)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def merge_parts(ctx: Context, layout: RunLayout, workers: int) -> dict:
    """Link every part's shards into one `shards/` folder with one manifest (parts stay until done); the
    shards sources are checked here, once."""
    final = layout.shards
    manifests = []
    for index in range(workers):
        path = part_dir(layout, index) / PART_MANIFEST
        if not path.is_file():
            raise PipelineError(f"shard part {index} of {workers} is missing ({path}): run it with "
                                f"shard.worker_index={index} shard.num_workers={workers} first")
        manifests.append(json.loads(path.read_text()))
    first = manifests[0]
    for m in manifests:
        if (m["num_parts"], m["tokenizer_sha256"], m["seed"], m["val_fraction"], sorted(m.get("sources", {}))) != (
                workers, first["tokenizer_sha256"], first["seed"], first["val_fraction"], sorted(first["sources"])):
            raise PipelineError(f"shard part {m['part']} was written with another tokenizer, sources or split "
                                f"settings; rerun it")
    staging = fresh_dir(final.with_name(final.name + ".tmp"))
    with removed_on_error(staging):
        merged = {key: first[key] for key in (*MANIFEST_HEADER, "format_version")}
        merged["num_parts"] = workers
        merged["sources"] = {}
        for name in first["sources"]:
            folder = first["sources"][name].get("folder", name)
            body = {"splits": {split: {"documents": 0, "tokens": 0, "shards": []} for split in SPLITS},
                    "corpus": first["sources"][name]["corpus"], "folder": folder}
            for index, m in enumerate(manifests):
                for split in SPLITS:
                    (staging / folder / split).mkdir(parents=True, exist_ok=True)
                    part_split = m["sources"][name]["splits"][split]
                    for info in part_split["shards"]:
                        for suffix in (".bin", ".idx"):
                            os.link(part_dir(layout, index) / folder / split / (info["prefix"] + suffix),
                                    staging / folder / split / (info["prefix"] + suffix))
                    target = body["splits"][split]
                    target["documents"] += part_split["documents"]
                    target["tokens"] += part_split["tokens"]
                    target["shards"] += part_split["shards"]
            merged["sources"][name] = body
        merged["sources"].update(write_sources(ctx, ctx.cfg.shard, ctx.cfg.data, staging, None, text=False)["sources"])
        atomic_write_json(staging / MANIFEST, merged)
    replace_dir(staging, final)
    shutil.rmtree(layout.shard_parts)
    return merged


def fresh_dir(path: Path) -> Path:
    """An empty staging folder (leftovers of a killed run are discarded)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    fsync_dir(path.parent)
    return path
