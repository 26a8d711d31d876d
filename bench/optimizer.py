"""AdamW against Muon on the same pretraining run: validation loss and wall time per step.

Builds the default corpus's tokenizer and shards once (`python -m pipeline stages=[tokenize,shard]`, the
defaults) in --dir, then runs the pretrain stage from scratch for --steps steps with `optimizer=adamw`
(train.lr = --adamw-lr) and with `optimizer=muon` at each --muon-ratios value (Muon's peak lr = ratio ×
train.lr; the AdamW half keeps train.lr). Everything else is the default run's: the tiny model, 2 CPU ranks
(or one per GPU), seq_len 256, global batch 16, so every run sees the same tokens in the same order.
Each run is a fresh `python -m pipeline`, one after the other. Figures: the validation loss at the last
step (the fixed slice of shards/val), the median of the logged `step_time_s` past the first window (warm-up),
and the run's wall time. Prints a table and appends a dated row to bench/RESULTS.md (--no-record: not).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/optimizer.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import print_table, record  # noqa: E402


def cli(run_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"run_dir={run_dir}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")


def pretrain(data: Path, run_dir: Path, steps: int, overrides: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for name in ("tokenizer", "shards"):
        shutil.copytree(data / name, run_dir / name)
    started = time.perf_counter()
    cli(run_dir, "stages=[pretrain]", f"train.max_steps={steps}", f"train.eval_interval={steps}",
        f"train.save_interval={steps}", *overrides)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("stage") == "pretrain"]
    val = next(r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None)
    times = [r["step_time_s"] for r in records if "step_time_s" in r][1:]  # the first window holds the warm-up
    train = [r for r in records if "loss" in r]
    return {"val_loss": val, "train_loss": train[-1]["loss"], "step_s": statistics.median(times), "wall_s": wall,
            "tokens": train[-1]["tokens_seen"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--adamw-lr", type=float, default=3e-3, help="train.lr (the default)")
    parser.add_argument("--muon-ratios", type=float, nargs="+", default=[5.0, 10.0, 20.0],
                        help="optimizer.muon_lr_ratio values: Muon's peak lr = ratio × --adamw-lr")
    parser.add_argument("--dir", type=Path, default=Path(ROOT) / "bench" / "out" / "optimizer")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (deepspeed=zero3 ...)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    data = args.dir / "data"
    if not (data / "shards" / "manifest.json").is_file():
        cli(data, "stages=[tokenize,shard]")
    runs = [("adamw", f"lr {args.adamw_lr:g}", ["optimizer=adamw"])]
    runs += [("muon", f"lr {args.adamw_lr * r:g} (ratio {r:g}), AdamW half {args.adamw_lr:g}",
              ["optimizer=muon", f"optimizer.muon_lr_ratio={r}"]) for r in args.muon_ratios]
    rows = []
    for name, lrs, overrides in runs:
        result = pretrain(data, args.dir / f"{name}-{len(rows)}", args.steps,
                          [f"train.lr={args.adamw_lr}", *overrides, *args.extra])
        rows.append({"optimizer": name, "learning rates": lrs, "val loss": f"{result['val_loss']:.4f}",
                     "train loss": f"{result['train_loss']:.4f}", "step s (median)": f"{result['step_s']:.4f}",
                     "wall s": f"{result['wall_s']:.1f}", "tokens": str(result["tokens"])})
        print_table(rows[-1:])
    print()
    print_table(rows)
    if not args.no_record:
        load = os.getloadavg()[0]
        command = "python bench/optimizer.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        record(command, [f"{r['optimizer']} {r['learning rates']}: val loss {r['val loss']}, train loss "
                         f"{r['train loss']}, {r['step s (median)']} s/step median, {r['wall s']} s wall, "
                         f"{r['tokens']} tokens, {args.steps} steps; load {load:.1f}" for r in rows])


if __name__ == "__main__":
    main()
