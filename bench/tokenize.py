#!/usr/bin/env python
"""Benchmark the `shard` stage against raw SentencePiece batch encoding on the same corpus and cores.

    python bench/tokenize.py CORPUS [--min-mb 100] [--threads N] [--repeats 3] [--vocab 8000]
        [--shapes big many] [--file-kb 24] [--many-dir DIR]
    python bench/tokenize.py CORPUS --train [--min-mb 1000] [--threads N] [--vocab 8000]

Goals (issue): shard MB/s >= 0.9 x raw MB/s, and shard peak RSS
under 2 GB for a 1 GB corpus. raw is the issue's reference, a plain script: read the files (open(); json.loads
per .jsonl line) and call `sp.encode(docs, num_threads=N)` on all of them at once; both sides are timed from
their first read to their last token. A corpus under --min-mb is first repeated into bench/out/ as .jsonl
(.txt: one document per blank-line-separated block). Every measurement runs in a fresh process, so
each peak RSS is its own; interpreter and import startup are excluded from the timings, but not what
the stage itself loads (datasets' streaming reader set-up, ~0.2 s). "cores" is CPU time over
wall time: well under --threads means the cores were shared (see the load average) or idle. A row is
appended to bench/RESULTS.md. raw holds every document and token id in memory (~17x the corpus):
use --shard-only for large corpora.

Two corpus shapes, measured side by side (--shapes, default both): "big", one large file of small
documents (CORPUS, repeated to --min-mb); "many", a folder of medium files, one document each, as a
documentation or code tree is: --many-dir if given (a real one), else generated from CORPUS's text into
bench/out/ (--min-mb of it, cut into files of --file-kb KB; 24 KB and ~5,000 files by default, the shape of
the 141 MB documentation tree the issue measured).

--train times the `tokenize` stage instead (SentencePiece training on a sample of the corpus), run as a user
runs it, against the issue's goal of 1 GB in at most 5 minutes and 16 GB. Its corpus is repeated with
variation (`variant`: letter swaps per repeat, so the vocabulary of words grows with the size, as real text's
does); it reports the wall time of the command and the peak RSS of its whole process tree.
"""
import os
import sys

# `python bench/tokenize.py` puts bench/ first on sys.path, where this file would shadow the standard
# library's `tokenize` (logging imports it through linecache): put the checkout root there instead.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import RESULTS, MemorySampler, peak_rss_mib, print_table, record  # noqa: E402

OUT = Path(ROOT) / "bench" / "out"
MB = 1e6


def variant(repeat: int) -> dict:
    """The letter swaps of one repeat of the corpus: none for the first; then a pair of less frequent lowercase
    letters and a pair of capitals, seeded by the repeat. Word types then keep growing with the corpus, as in
    real text (a 1 MB vocabulary repeated a thousand times would flatter the tokenizer's trainer)."""
    if repeat == 0:
        return {}
    rng = random.Random(repeat)
    (a, b), (c, d) = rng.sample("bcfgjkmpqvwxyz", 2), rng.sample(string.ascii_uppercase, 2)
    return str.maketrans(a + b + c + d, b + a + d + c)


def bench_corpus(src: Path, min_mb: float, vary: bool = False) -> Path:
    """`src` itself if it is large enough, else a .jsonl under bench/out/ repeating its documents; with `vary`,
    each repeat's texts with the letter swaps of `variant`."""
    if src.stat().st_size >= min_mb * MB:
        return src
    suffix = src.suffix.lower()
    if suffix in (".txt", ".text"):
        docs = [doc for doc in re.split(r"\n[ \t]*\n", src.read_text(encoding="utf-8", errors="replace"))
                if doc.strip()]
        records = [json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs]
        text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    elif suffix == ".jsonl":  # records repeated as they are; text counted in a "text" field if there is one
        records = [line.rstrip("\n") + "\n" for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [json.loads(line).get("text") for line in records]
        text_bytes = sum(len((t if isinstance(t, str) else r).encode("utf-8")) for t, r in zip(texts, records))
    else:
        sys.exit(f"{src} is under --min-mb={min_mb}; only .txt and .jsonl can be repeated (or pass --min-mb 0)")
    dst = OUT / f"{src.stem}-{min_mb:g}mb{'-varied' if vary else ''}.jsonl"
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    chunk = "".join(records).encode("utf-8")
    repeats = max(1, -(-int(min_mb * MB) // max(1, text_bytes)))
    objects = [json.loads(record) for record in records] if vary else []
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for repeat in range(repeats):
            if vary and repeat:  # only the text changes: other fields, and the keys, stay as they are
                table = variant(repeat)
                chunk = "".join(json.dumps({**o, "text": o["text"].translate(table)} if isinstance(o.get("text"), str)
                                           else o, ensure_ascii=False) + "\n" for o in objects).encode("utf-8")
            f.write(chunk)
    tmp.replace(dst)
    print(f"bench corpus: {dst} ({len(records) * repeats} documents, {dst.stat().st_size / MB:.1f} MB)")
    return dst


def many_files_corpus(src: Path, min_mb: float, file_kb: float) -> Path:
    """A folder under bench/out/ of .txt files of about file_kb KB, one document each, min_mb in all, cut from
    the text of `src` (a file of the big shape), repeated as needed; made once."""
    size = max(1, int(file_kb * 1e3))
    count = max(2, int(min_mb * MB) // size)
    dst = OUT / f"many-{src.stem}-{count}x{file_kb:g}kb"
    if dst.is_dir() and dst.stat().st_mtime >= src.stat().st_mtime and len(list(dst.iterdir())) == count:
        return dst
    text = src.read_text(encoding="utf-8", errors="replace")
    if src.suffix.lower() == ".jsonl":
        text = "\n\n".join(json.loads(line).get("text", "") for line in text.splitlines() if line.strip())
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        start = (i * size) % max(1, len(text) - size)
        (tmp / f"doc{i:05d}.txt").write_text(text[start:start + size], encoding="utf-8")
    if dst.exists():
        import shutil
        shutil.rmtree(dst)
    tmp.rename(dst)
    print(f"bench corpus: {dst} ({count} files of {file_kb:g} KB)")
    return dst


def run_dir_for(corpus: Path) -> Path:
    return OUT / f"run-{corpus.stem}"


def tokenize_command(corpus: Path, vocab: int, text_field: str, *extra: str) -> list[str]:
    quoted = "'" + str(corpus).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [sys.executable, "-m", "pipeline", "stages=[tokenize]", "data=files", f"data.paths=[{quoted}]",
            f"data.split_on_blank_lines={str(is_txt(corpus)).lower()}",
            f"data.text_field={text_field}", f"run_dir={run_dir_for(corpus)}", f"tokenizer.vocab_size={vocab}", *extra]


def train_tokenizer(corpus: Path, vocab: int, text_field: str) -> None:
    """The pipeline's own tokenize stage (skipped when complete and unchanged)."""
    cmd = tokenize_command(corpus, vocab, text_field)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit("training the tokenizer failed (see above): " + shlex.join(cmd))


def measure_training(corpus: Path, args) -> dict:
    """One run of the tokenize stage (force=true) as a user runs it: wall time of the whole command, the
    stage's own seconds (its completion record), and the peak RSS of the command's process tree, sampled
    every 0.1 s, alongside ru_maxrss (the largest single process, exact)."""
    cmd = tokenize_command(corpus, args.vocab, args.text_field, f"tokenizer.num_threads={args.threads}", "force=true")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    sampler = MemorySampler(pid=proc.pid, tree=True, interval=0.1)
    code = proc.wait()
    seconds = time.perf_counter() - started
    tree_peak = sampler.stop()
    if code != 0:
        sys.exit(f"the tokenize stage failed (exit {code}, see above): {shlex.join(cmd)}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    stage = json.loads((run_dir_for(corpus) / "stages" / "tokenize.json").read_text())
    return {"seconds": seconds, "stage_seconds": stage["seconds"], "cores": cpu / seconds,
            "tree_peak_mib": tree_peak, "max_process_mib": peak_rss_mib(children=True)}


def is_txt(corpus: Path) -> bool:
    return corpus.suffix.lower() in (".txt", ".text")


def pipeline_config(corpus: Path, vocab: int, threads: int, text_field: str):
    from pipeline.config import DataConfig, PipelineConfig, ShardConfig, TokenizerConfig

    return PipelineConfig(run_dir=str(run_dir_for(corpus)), stages=["shard"], force=True,
                          data=DataConfig(source="files", paths=[str(corpus)], text_field=text_field,
                                          split_on_blank_lines=is_txt(corpus)),
                          tokenizer=TokenizerConfig(vocab_size=vocab), shard=ShardConfig(encode_threads=threads))


def child(kind: str, corpus: Path, vocab: int, threads: int, text_field: str) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    started = time.perf_counter()
    import datasets  # noqa: F401  import startup, excluded like the interpreter's (the stage imports it lazily)

    from pipeline.cluster.distributed import LaunchInfo
    from pipeline.data.vocab import load_tokenizer
    from pipeline.runner import PIPELINE, Context, prepare_run_dir, run_stage
    import_s = time.perf_counter() - started
    cfg = pipeline_config(corpus, vocab, threads, text_field)
    ctx = Context(cfg=cfg, run_dir=prepare_run_dir(cfg), launch=LaunchInfo.from_env())
    if kind == "raw":
        sp = load_tokenizer(ctx.tokenizer_path)
        started, cpu = time.perf_counter(), time.process_time()
        docs = plain_documents(ctx.corpus_paths, cfg.data)
        ids = sp.encode(docs, num_threads=threads)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        figures = dict(text_bytes=sum(len(doc.encode("utf-8")) for doc in docs), docs=len(docs),
                       tokens=sum(map(len, ids)))
    else:
        stage = next(s for s in PIPELINE if s.name == "shard")
        started, cpu = time.perf_counter(), time.process_time()
        run_stage(stage, ctx)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        manifest = json.loads((ctx.run_dir / "shards" / "manifest.json").read_text())["sources"]["corpus"]
        docs = sum(s["documents"] for s in manifest["splits"].values())
        tokens = sum(s["tokens"] for s in manifest["splits"].values()) - docs  # less one EOS per document
        figures = dict(text_bytes=manifest["corpus"]["text_bytes"], docs=docs, tokens=tokens)
    peak = peak_rss_mib() * 2**20
    return dict(kind=kind, seconds=seconds, cores=cpu / seconds, import_s=import_s, peak_rss=peak, **figures)


def plain_documents(paths: list[Path], data) -> list[str]:
    """The documents as a plain script reads them (the issue's reference: read the files, then encode): open()
    and, for .jsonl, json.loads per line; the non-empty ones, as the stage keeps. Other formats through the
    pipeline's own reader."""
    docs: list[str] = []
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in (".txt", ".text"):
            text = path.read_text(encoding="utf-8")
            docs += text.split("\n\n") if data.split_on_blank_lines else [text]  # as datasets splits
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                docs += [json.loads(line)[data.text_field] for line in f if line.strip()]
        else:
            from pipeline.data.corpus import Corpus
            docs += Corpus([path], data).texts()
    return [doc for doc in docs if doc and not doc.isspace()]


def measure(kind: str, args, corpus: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--text-field", args.text_field, str(corpus)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mb_s"] = result["text_bytes"] / MB / result["seconds"]
    print(f"  {kind:5s} {result['seconds']:7.2f} s  {result['mb_s']:7.2f} MB/s  {result['cores']:4.2f} cores busy  "
          f"peak RSS {result['peak_rss'] / 2**20:6.0f} MiB  (imports {result['import_s']:.1f} s, untimed)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring.")
    parser.add_argument("corpus", type=Path, help="a .txt, .jsonl, .json or .parquet file")
    parser.add_argument("--min-mb", type=float, default=100, help="repeat a smaller corpus to this size (default 100)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="encode threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="raw/shard pairs, alternated (default 3)")
    parser.add_argument("--vocab", type=int, default=8000, help="tokenizer.vocab_size (default 8000)")
    parser.add_argument("--text-field", default="text", help="data.text_field for .jsonl/.json/.parquet (default text)")
    parser.add_argument("--shapes", nargs="+", choices=["big", "many"], default=["big", "many"],
                        help="corpus shapes to measure, side by side (default both; see the module docstring)")
    parser.add_argument("--file-kb", type=float, default=24, help="many: size of each generated file (default 24)")
    parser.add_argument("--many-dir", type=Path, help="many: a real folder of files instead of generated ones")
    parser.add_argument("--shard-only", action="store_true",
                        help="skip raw (for corpora whose token ids do not fit in memory)")
    parser.add_argument("--train", action="store_true",
                        help="time the tokenize stage (SentencePiece training) instead, on a corpus repeated with "
                             "variation to --min-mb: wall time and the peak RSS of its process tree")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--child", choices=["raw", "shard"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # internal: one measurement, figures as the last stdout line
        print(json.dumps(child(args.child, args.corpus.resolve(), args.vocab, args.threads, args.text_field)))
        return

    command = shlex.join(["python", *sys.argv])
    if args.train:
        train_main(args, command)
        return
    big = bench_corpus(args.corpus.resolve(), args.min_mb)
    corpora = {"big": big, "many": args.many_dir.resolve() if args.many_dir else None}
    if "many" in args.shapes and corpora["many"] is None:
        corpora["many"] = many_files_corpus(big, args.min_mb, args.file_kb)
    rows = [measure_shape(shape, corpora[shape], args) for shape in args.shapes]
    print()
    print_table(rows)
    print(f"\ncorpus MB: UTF-8 text, 1 MB = 1e6 bytes; MB/s and cores (CPU seconds / wall seconds, all threads): "
          f"medians of {args.repeats}; load: 1-minute load average at the start")
    if not args.shard_only:
        print("ratio: median of per-pair shard/raw MB/s (goal >= 0.9 on both shapes); cpu ratio: the same by CPU "
              "seconds (raw CPU s / shard CPU s), steadier when other processes share the cores")
    if not args.no_record:
        record(command, rows)


def measure_shape(shape: str, corpus: Path, args) -> dict:
    """One shape's row: --repeats raw/shard pairs, alternated."""
    train_tokenizer(corpus, args.vocab, args.text_field)
    kinds = ("shard",) if args.shard_only else ("raw", "shard")
    load = os.getloadavg()[0]
    files = sum(1 for p in corpus.rglob("*") if p.is_file()) if corpus.is_dir() else 1
    size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file()) if corpus.is_dir() else corpus.stat().st_size
    print(f"{shape}: corpus {corpus} ({files} files, {size / MB:.1f} MB on disk), {args.threads} threads, "
          f"{args.repeats} x {kinds}, load average {load:.2f}", flush=True)
    if load > 0.5:
        print("WARNING: the machine is busy: other processes share these cores and skew the figures")
    runs = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            runs[kind].append(measure(kind, args, corpus))
    shard = runs["shard"][0]
    med = {kind: statistics.median(r["mb_s"] for r in rs) for kind, rs in runs.items()}
    cores = {kind: statistics.median(r["cores"] for r in rs) for kind, rs in runs.items()}
    peak = {kind: max(r["peak_rss"] for r in rs) / 2**20 for kind, rs in runs.items()}
    row = {"shape": shape, "files": f"{files:,}", "corpus MB": f"{shard['text_bytes'] / MB:.1f}",
           "docs": f"{shard['docs']:,}",
           "tokens": f"{shard['tokens']:,}", "threads": str(args.threads)}
    if not args.shard_only:
        raw = runs["raw"][0]
        if (raw["docs"], raw["tokens"]) != (shard["docs"], shard["tokens"]):
            print(f"WARNING: raw and shard disagree: docs {raw['docs']} vs {shard['docs']}, "
                  f"tokens {raw['tokens']} vs {shard['tokens']}")
        ratios = [s["mb_s"] / r["mb_s"] for r, s in zip(runs["raw"], runs["shard"])]
        # CPU seconds of raw / of shard, per pair: reading and writing count even where they overlap the encoding;
        # on a shared machine (cores busy well under --threads) the steadier of the two
        cpu_ratios = [(r["cores"] * r["seconds"]) / (s["cores"] * s["seconds"])
                      for r, s in zip(runs["raw"], runs["shard"])]
        row.update({"raw": "read + encode", "raw MB/s": f"{med['raw']:.2f}", "shard MB/s": f"{med['shard']:.2f}",
                    "ratio": f"{statistics.median(ratios):.3f}", "cpu ratio": f"{statistics.median(cpu_ratios):.3f}",
                    "raw cores": f"{cores['raw']:.2f}",
                    "shard cores": f"{cores['shard']:.2f}", "shard peak RSS": f"{peak['shard']:.0f} MiB",
                    "raw peak RSS": f"{peak['raw']:.0f} MiB"})
    else:
        row.update({"shard MB/s": f"{med['shard']:.2f}", "shard cores": f"{cores['shard']:.2f}",
                    "shard peak RSS": f"{peak['shard']:.0f} MiB"})
    row["load"] = f"{load:.2f}"
    if not args.shard_only:
        print(f"{shape}: shard/raw per pair: " + ", ".join(f"{r:.3f}" for r in ratios) + "; by CPU seconds: "
              + ", ".join(f"{r:.3f}" for r in cpu_ratios), flush=True)
    return row


TRAIN_GOAL_S, TRAIN_GOAL_GIB = 300, 16  # the issue: 1 GB in at most 5 minutes and 16 GB


def train_main(args, command: str) -> None:
    from pipeline.config import TokenizerConfig

    corpus = bench_corpus(args.corpus.resolve(), args.min_mb, vary=True)
    docs = None
    if corpus.suffix == ".jsonl":  # one record per line
        with open(corpus, "rb") as f:
            docs = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    size_mb = corpus.stat().st_size / MB
    defaults = TokenizerConfig()
    load_start = os.getloadavg()[0]
    print(f"corpus {corpus} ({size_mb:.1f} MB on disk), vocab {args.vocab}, {args.threads} threads, sample "
          f"{defaults.input_sentence_size:,} chunks of at most {defaults.max_sentence_bytes} bytes, load average "
          f"{load_start:.2f}", flush=True)
    result = measure_training(corpus, args)
    gib = result["tree_peak_mib"] / 1024
    met = result["seconds"] <= TRAIN_GOAL_S and gib <= TRAIN_GOAL_GIB
    row = {"corpus MB": f"{size_mb:.1f}", "docs": "-" if docs is None else f"{docs:,}", "vocab": str(args.vocab),
           "sample chunks": f"{defaults.input_sentence_size:,}", "threads": str(args.threads),
           "wall s": f"{result['seconds']:.1f}", "stage s": f"{result['stage_seconds']:.1f}",
           "MB/s": f"{size_mb / result['seconds']:.2f}", "cores": f"{result['cores']:.2f}",
           "peak RSS (tree)": f"{result['tree_peak_mib']:.0f} MiB",
           "max process RSS": f"{result['max_process_mib']:.0f} MiB",
           "goal": f"≤{TRAIN_GOAL_S} s, ≤{TRAIN_GOAL_GIB} GiB " + ("met" if met else "missed"),
           "load": f"{load_start:.2f}→{os.getloadavg()[0]:.2f}"}
    print()
    print_table([row])
    print("\ncorpus MB: the .jsonl on disk, 1 MB = 1e6 bytes; wall s: the whole `python -m pipeline stages=[tokenize]` "
          "command (interpreter and imports included), stage s: the stage alone (its completion record); cores: "
          "CPU seconds of the command / wall seconds; peak RSS (tree): the command and its children summed, sampled "
          "every 0.1 s; max process RSS: ru_maxrss of the largest one; load: 1-minute load average at start→end")
    if not args.no_record:
        record(command, row)


if __name__ == "__main__":
    main()
