"""Checkpoint cost: how long a save blocks training, with the background writer and without it, and
how long a resume takes.

For each --model preset one DeepSpeed engine is built as the pretrain stage builds it
(`pipeline.train.engine.build_engine`, one rank: gloo on CPU, nccl on GPU) and stepped once, so the
optimizer state exists. Then, for each mode (sync: `train.async_checkpoint=false`; async: the
default background writer), --saves saves go through `pipeline.checkpoint.store.save_checkpoint` into
--dir, each timed:
  blocked_s    how long save_checkpoint held the training thread (async: the host copy)
  committed_s  from the start of the save until its completion record is written (writer.wait())
While an async save is being written the benchmark keeps training (micro batch --micro-batch ×
--seq-len), and reports the median step time then against the median of the same steps with the
writer idle (`steps_during_write`, `step_s_writing / step_s_idle`): the writer's share of the cores
or of the GPU's host. Finally the resume: `find_resumable` with every file's sha256 (verify_s) and
`load_checkpoint` into the engine (load_s), as `train.resume=auto` does them.

--elastic: the resume on another world size instead. Two spawned ranks build the engine, step once and save
(ZeRO --zero, 2 ranks); then this process, a world of one, builds its engine and resumes from that checkpoint
as train.resume does: `universal_checkpoint` converts it to DeepSpeed's universal format (convert_s, with the
peak resident memory of this process and its conversion workers, and the universal folder's size), then
`load_checkpoint(universal=True)` (load_s); a second prepare finds the conversion done and verifies it
(reuse_s, the sha256 of every file).

Prints a table and appends one dated row per model and mode to bench/RESULTS.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/checkpoint.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import MemorySampler, hardware, print_table, quiet_logs, record  # noqa: E402
from bench.train import join_world_of_one, load_model_config, sync  # noqa: E402
from pipeline.checkpoint import elastic  # noqa: E402
from pipeline.checkpoint.store import find_resumable, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.checkpoint.writer import BackgroundWriter  # noqa: E402
from pipeline.config import DeepSpeedConfig, PrecisionConfig, TrainConfig  # noqa: E402
from pipeline.train.checkpointing import universal_checkpoint  # noqa: E402
from pipeline.train.engine import build_engine  # noqa: E402


def train_step(engine, batch, device) -> float:
    start = time.perf_counter()
    _, loss = engine(batch[:, :-1], batch[:, 1:])
    engine.backward(loss)
    engine.step()
    sync(device)
    return time.perf_counter() - start


def measure_mode(engine, root: Path, background: bool, args, batch, device, first_step: int) -> dict:
    engine.checkpoint_engine = BackgroundWriter(background=background)
    blocked, committed, writing, idle = [], [], [], []
    for number in range(args.saves):
        state = {"step": first_step + number, "tokens_seen": 0, "loader": None, "model": None}
        start = time.perf_counter()
        save_checkpoint(engine, root, first_step + number, state, keep_last=2)
        blocked.append(time.perf_counter() - start)
        while background and not engine.checkpoint_engine.idle():
            writing.append(train_step(engine, batch, device))  # training goes on beside the writer
        engine.checkpoint_engine.wait()
        committed.append(time.perf_counter() - start)
        if background:  # the same number of steps with the writer idle
            idle += [train_step(engine, batch, device) for _ in range(max(1, len(writing) - len(idle)))]
    folder = root / f"step_{first_step + args.saves - 1:08d}"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    row = {"mode": "async" if background else "sync", "ckpt_gb": f"{size / 1e9:.2f}",
           "blocked_s": f"{statistics.median(blocked):.3f}", "blocked_max_s": f"{max(blocked):.3f}",
           "committed_s": f"{statistics.median(committed):.2f}",
           "write_gb_per_s": f"{size / 1e9 / statistics.median(committed):.2f}"}
    if background:
        row.update({"steps_during_write": str(len(writing)),
                    "step_s_writing": f"{statistics.median(writing):.3f}" if writing else "-",
                    "step_s_idle": f"{statistics.median(idle):.3f}",
                    "slowdown": f"{statistics.median(writing) / statistics.median(idle):.2f}x" if writing else "-"})
    return row


def measure_resume(engine, root: Path) -> dict:
    start = time.perf_counter()
    folder, _ = find_resumable(root, digests=True)
    verified = time.perf_counter()
    load_checkpoint(engine, folder)
    done = time.perf_counter()
    return {"verify_s": f"{verified - start:.2f}", "load_s": f"{done - verified:.2f}",
            "resume_s": f"{done - start:.2f}"}


def _engine(name: str, args, device):
    model_cfg = load_model_config(name, args.vocab)
    train = TrainConfig(micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch, seq_len=args.seq_len)
    ds = DeepSpeedConfig(name=f"zero{args.zero}", stage=args.zero)
    return build_engine(model_cfg, train, ds, PrecisionConfig(name=args.precision), device, 1)


def _write_on_two_ranks(rank: int, port: int, name: str, root: str, args) -> None:
    """One of two spawned ranks: build, step once, save step 1 under `root`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    quiet_logs()
    device = join_world_of_one()
    engine, _ = _engine(name, args, device)
    batch = torch.randint(4, args.vocab, (args.micro_batch, args.seq_len + 1), device=device)
    train_step(engine, batch, device)
    save_checkpoint(engine, Path(root), 1, {"step": 1, "tokens_seen": 0, "loader": None, "model": None}, keep_last=2)
    engine.checkpoint_engine.wait()
    torch.distributed.barrier()


def measure_elastic(name: str, root: Path, args, device) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    mp.spawn(_write_on_two_ranks, args=(port, name, str(root), args), nprocs=2, join=True)
    written = time.perf_counter() - start
    engine, n_params = _engine(name, args, device)
    folder, record_ = find_resumable(root, digests=True)
    source_gb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9
    with MemorySampler(tree=True) as memory:
        base = memory.sample()
        start = time.perf_counter()
        universal = universal_checkpoint(folder, record_, "bench")
        converted = time.perf_counter()
    load_checkpoint(engine, universal, universal=True)
    loaded = time.perf_counter()
    universal_checkpoint(folder, record_, "bench")
    reused = time.perf_counter()
    size = sum(p.stat().st_size for p in universal.rglob("*") if p.is_file())
    return {"model": name, "params": f"{n_params / 1e6:.0f}M", "zero": str(args.zero), "precision": args.precision,
            "ranks": "2→1", "ckpt_gb": f"{source_gb:.2f}", "write_2_ranks_s": f"{written:.1f}",
            "convert_s": f"{converted - start:.2f}", "universal_gb": f"{size / 1e9:.2f}",
            "files": str(sum(1 for p in universal.rglob('*') if p.is_file())),
            "rss_before_mib": f"{base:.0f}", "peak_rss_mib": f"{memory.peak:.0f}",
            "load_s": f"{loaded - converted:.2f}", "resume_s": f"{loaded - start:.2f}",
            "reuse_s": f"{reused - loaded:.2f}",
            "workers": "{num_extract_workers}/{num_merge_workers}".format(**elastic.workers(folder, 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["125m"], help="conf/model presets (default 125m)")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode (default 3)")
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp folder, removed after)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--elastic", action="store_true", help="the conversion and resume on another world size")
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])

    quiet_logs()
    device = join_world_of_one()
    hw = hardware()
    print(f"# {hw}; torch {torch.__version__}; deepspeed {__import__('deepspeed').__version__}")
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    rows = []
    try:
        for name in args.model if args.elastic else []:
            rows.append(measure_elastic(name, base / name, args, device))
            print(rows[-1], flush=True)
        for name in [] if args.elastic else args.model:
            engine, n_params = _engine(name, args, device)
            batch = torch.randint(4, args.vocab, (args.micro_batch, args.seq_len + 1), device=device)
            train_step(engine, batch, device)  # the optimizer state exists from here
            root = base / name
            common = {"model": name, "params": f"{n_params / 1e6:.0f}M", "zero": str(args.zero),
                      "precision": args.precision}
            for background in (False, True):
                row = measure_mode(engine, root / ("async" if background else "sync"), background, args, batch,
                                   device, first_step=1)
                rows.append({**common, **row})
                print(rows[-1], flush=True)
            rows[-1].update(measure_resume(engine, root / "async"))
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = [{k: row.get(k, "") for k in keys} for row in rows]
    print()
    print_table(table)
    if args.elastic:
        print("convert: universal_checkpoint (ds_to_universal + record + rename); peak_rss: this process and its "
              "workers; load: load_checkpoint(universal=True); reuse: prepare again (verify sha256)")
    else:
        print(f"blocked: time in save_checkpoint; committed: until complete.json; slowdown: median train step "
              f"while the writer works / with it idle (micro batch {args.micro_batch} × seq {args.seq_len}); "
              f"resume: find_resumable with sha256 + load_checkpoint")
    if not args.no_record:
        record(command, rows, hw)


if __name__ == "__main__":
    main()
