"""Pretraining loader throughput: tokens/s of `PretrainLoader.next_global_batch` on synthetic shards.

Builds a shard set of --tokens random uint16 tokens (documents of random length, each ending with EOS,
shards of --shard-mtok million tokens so windows cross files) in a temporary folder, or in --dir where
it is reused when already there. Then times `open_split` (verify=full: sha256 + token-id range of every
file) and --steps optimizer steps of `next_global_batch` (seq_len 2048, global batch 256 by default).
The shards were just written, so they are in the page cache: this is the loader's own cost, not the disk's.
With --sources N, the same tokens are split into N sources (shards/<source>/, equal weights) and one run
times the mixture loader (pipeline/data/mixture.py) on them beside the one-source loader on the same bytes.
Prints a table and appends a dated row to bench/RESULTS.md (--no-record: not).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/loader.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import print_table, record  # noqa: E402
from pipeline.data.indexed import IndexedDatasetWriter  # noqa: E402
from pipeline.data.mixture import Blend, MixtureLoader  # noqa: E402
from pipeline.data.stream import PretrainLoader, open_split  # noqa: E402
from pipeline.fsutil import atomic_write_json, sha256_file  # noqa: E402

VOCAB, EOS = 32000, 2


def build_shards(folder: Path, num_tokens: int, shard_tokens: int, seed: int = 0) -> Path:
    """folder/shards/{train,val} + manifest.json as shard.py writes them, and a stand-in tokenizer."""
    shards, tokenizer = folder / "shards", folder / "tokenizer.model"
    if (shards / "manifest.json").is_file():
        return tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"bench/loader.py stand-in tokenizer")
    rng = np.random.default_rng(seed)
    splits = {}
    for split, total in (("train", num_tokens), ("val", max(1 << 16, num_tokens // 100))):
        (shards / split).mkdir(parents=True, exist_ok=True)
        infos, left = [], total
        while left:
            n = min(left, shard_tokens)
            with IndexedDatasetWriter(shards / split / f"{len(infos):05d}", np.uint16) as w:
                for lo in range(0, n, 1 << 24):  # 16M tokens at a time bounds memory
                    tokens = rng.integers(3, VOCAB, min(1 << 24, n - lo), dtype=np.uint16)
                    lengths = rng.geometric(1 / 1500, size=tokens.size // 1500 + 10)
                    ends = np.cumsum(lengths)
                    ends = ends[ends < tokens.size]
                    tokens[ends - 1] = EOS
                    tokens[-1] = EOS
                    w.add_documents(tokens, np.diff(np.concatenate([[0], ends, [tokens.size]])))
                infos.append(asdict(w.finalize()))
            left -= n
        splits[split] = {"documents": sum(i["num_documents"] for i in infos), "tokens": total, "shards": infos}
    atomic_write_json(shards / "manifest.json", {
        "format": "MMIDIDX", "format_version": 1, "tokenizer_sha256": sha256_file(tokenizer), "vocab_size": VOCAB,
        "dtype": "uint16", "eos_id": EOS, "bos_id": 1, "pad_id": -1, "val_fraction": 0.01, "seed": seed,
        "splits": splits})
    return tokenizer


def build_mixture(folder: Path, tokenizer: Path, sources: int) -> list[str]:
    """shards/<source>/train for `sources` sources, each a run of whole shard files of the one-source set
    (hard links: the same bytes) and one manifest listing them all."""
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    infos = manifest["splits"]["train"]["shards"]
    if len(infos) < sources:
        raise SystemExit(f"--sources {sources} needs at least as many shards: lower --shard-mtok")
    names = [f"s{i:02d}" for i in range(sources)]
    mixed = folder / f"mixture{sources}"
    if not (mixed / "manifest.json").is_file():
        bodies = {}
        for i, name in enumerate(names):
            mine = infos[i::sources]
            (mixed / name / "train").mkdir(parents=True, exist_ok=True)
            for info in mine:
                for suffix in (".bin", ".idx"):
                    target = mixed / name / "train" / (info["prefix"] + suffix)
                    if not target.exists():
                        os.link(folder / "shards" / "train" / (info["prefix"] + suffix), target)
            bodies[name] = {"splits": {"train": {"documents": sum(x["num_documents"] for x in mine),
                                                 "tokens": sum(x["num_tokens"] for x in mine), "shards": mine}}}
        atomic_write_json(mixed / "manifest.json", {**{k: v for k, v in manifest.items() if k != "splits"},
                                                    "format_version": 2, "sources": bodies})
    return names


def time_steps(loader, args) -> list[float]:
    loader.next_global_batch()  # first permutation and buffers
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        batches = loader.next_global_batch()
        times.append(time.perf_counter() - t)
    assert sum(x.shape[0] for x, _ in batches) == args.global_batch_size
    return times


def measure_sources(folder: Path, args) -> list[dict]:
    """One source against --sources sources on the same bytes, in one run."""
    tokenizer = build_shards(folder, args.tokens, int(args.shard_mtok * 1e6))
    names = build_mixture(folder, tokenizer, args.sources)
    rows = []
    for label in ("PretrainLoader", "1 source", f"{args.sources} sources"):
        if label == "PretrainLoader":  # the loader of one corpus, for reference
            stream = open_split(folder / "shards", "train", tokenizer, verify="off")
            loader = PretrainLoader(stream, args.seq_len, args.micro_batch_size, args.global_batch_size, 0, 1, seed=0)
        elif label == "1 source":
            stream = open_split(folder / "shards", "train", tokenizer, verify="off")
            loader = MixtureLoader({"all": stream}, Blend(["all"], {"all": 1.0}, [], args.global_batch_size),
                                   args.seq_len, args.micro_batch_size, args.global_batch_size, 0, 1, seed=0)
        else:
            streams = {n: open_split(folder / f"mixture{args.sources}", "train", tokenizer, verify="off", source=n)
                       for n in names}
            loader = MixtureLoader(streams, Blend(names, {n: 1.0 for n in names}, [], args.global_batch_size),
                                   args.seq_len, args.micro_batch_size, args.global_batch_size, 0, 1, seed=0)
        times = time_steps(loader, args)
        rows.append({"loader": label, "tokens": f"{args.tokens:,}", "seq_len": str(args.seq_len),
                     "global batch": str(args.global_batch_size), "micro batch": str(args.micro_batch_size),
                     "steps": str(args.steps), "step ms (median)": f"{np.median(times) * 1e3:.2f}",
                     "loader M tok/s": f"{args.global_batch_size * args.seq_len * len(times) / sum(times) / 1e6:.1f}"})
    for row in rows:
        row["vs 1 source"] = f"{float(row['loader M tok/s']) / float(rows[1]['loader M tok/s']):.2f}×"
    return rows


def measure(folder: Path, args) -> dict:
    tokenizer = build_shards(folder, args.tokens, int(args.shard_mtok * 1e6))
    started = time.perf_counter()
    stream = open_split(folder / "shards", "train", tokenizer, verify="full")
    verify_s = time.perf_counter() - started
    loader = PretrainLoader(stream, args.seq_len, args.micro_batch_size, args.global_batch_size, 0, 1, seed=0)
    loader.next_global_batch()  # first permutation and buffers
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        batches = loader.next_global_batch()
        times.append(time.perf_counter() - t)
    assert sum(x.shape[0] for x, _ in batches) == args.global_batch_size
    tokens_per_step = args.global_batch_size * args.seq_len
    return {"tokens": f"{stream.num_tokens:,}", "seq_len": str(args.seq_len),
            "global batch": str(args.global_batch_size), "micro batch": str(args.micro_batch_size),
            "steps": str(args.steps), "epochs": f"{loader.order.samples_consumed / loader.num_samples:.2f}",
            "step ms (median)": f"{np.median(times) * 1e3:.2f}",
            "loader M tok/s": f"{tokens_per_step * len(times) / sum(times) / 1e6:.1f}",
            "open verify=full s": f"{verify_s:.2f}",
            "verify GB/s": f"{stream.num_tokens * stream.dtype.itemsize / verify_s / 1e9:.2f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="build (or reuse) the shards here instead of a temporary folder")
    parser.add_argument("--tokens", type=int, default=200_000_000, help="train tokens (default 200M)")
    parser.add_argument("--shard-mtok", type=float, default=64, help="million tokens per shard (default 64)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps (default 300)")
    parser.add_argument("--sources", type=int, default=0,
                        help="time the mixture loader on this many sources against one source (the same bytes)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])
    run = measure_sources if args.sources else measure
    if args.dir:
        rows = run(args.dir.resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            rows = run(Path(tmp), args)
    rows = rows if isinstance(rows, list) else [rows]
    print_table(rows)
    print("loader M tok/s: input tokens of all timed steps / their total time, one process, page cache warm")
    if not args.no_record:
        record(command, rows)


if __name__ == "__main__":
    main()
