"""The pretrain stage for real: 2 CPU ranks over gloo, DeepSpeed ZeRO 1/2/3, the `tiny` model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import ROOT, error_lines, run_cli

pytestmark = pytest.mark.slow

TINY = ("model=tiny", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.log_interval=1", "train.warmup_steps=5", "train.lr=3e-3", "train.eval_batches=2")


def fresh_run(data_run: Path, target: Path) -> Path:
    for name in ("tokenizer", "shards"):
        shutil.copytree(data_run / name, target / name)
    return target


def pretrain(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *overrides)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> value of the last record holding `key` for that step (a resumed run rewrites steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == "pretrain" and record.get(key) is not None:
            out[record["step"]] = record[key]
    return out


@pytest.mark.parametrize("zero,precision", [("zero1", "fp32"), ("zero2", "bf16"), ("zero3", "fp32"),
                                            ("zero3_offload", "bf16")])
def test_zero_stages_train_and_the_loss_falls(tmp_path, data_run, zero, precision):
    run_dir = fresh_run(data_run, tmp_path)
    pretrain(run_dir, f"deepspeed={zero}", f"precision={precision}", "train.max_steps=30",
             "train.eval_interval=30", "launch.nproc_per_node=2")
    losses = records(run_dir)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0, losses
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_record = next(r for r in reversed(last) if "loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens_seen", "memory_gb"):
        assert train_record[key] is not None, key
    assert "mfu" in train_record  # null on CPU: there is no peak to compare against
    assert records(run_dir, "val_loss")[30] < losses[1]
    saves = [r for r in last if "checkpoint_blocked_s" in r]  # one per save (save_interval 100: the last)
    assert [r["step"] for r in saves] == [30] and 0 < saves[0]["checkpoint_blocked_s"] <= saves[0]["checkpoint_complete_s"]
    record = json.loads((run_dir / "stages" / "pretrain.json").read_text())
    assert any(name.endswith("complete.json") for name in record["outputs"])


def test_two_ranks_equal_one_rank_with_gradient_accumulation(tmp_path, data_run):
    curves = {}
    for ranks in (1, 2):
        run_dir = fresh_run(data_run, tmp_path / f"r{ranks}")
        pretrain(run_dir, "deepspeed=zero2", "precision=fp32", "train.max_steps=8", "train.eval_interval=100",
                 "train.global_batch_size=4", f"launch.nproc_per_node={ranks}")
        curves[ranks] = [records(run_dir)[s] for s in range(1, 9)]
    np.testing.assert_allclose(curves[1], curves[2], rtol=2e-5, atol=2e-5)


def test_bf16_without_zero_trains_like_zero2(tmp_path, data_run):
    """DeepSpeed's no-ZeRO bf16 optimizer steps once at construction; the engine undoes it."""
    curves = {}
    for zero in ("zero0", "zero2"):
        run_dir = fresh_run(data_run, tmp_path / zero)
        pretrain(run_dir, f"deepspeed={zero}", "precision=bf16", "train.max_steps=5", "train.eval_interval=100",
                 "launch.nproc_per_node=2")
        curves[zero] = [records(run_dir)[s] for s in range(1, 6)]
    np.testing.assert_allclose(curves["zero0"], curves["zero2"], rtol=2e-3)


def kill_after_checkpoint(run_dir: Path, overrides: tuple[str, ...], step: int) -> None:
    """Start a run and SIGKILL it (all its ranks) once the checkpoint of `step` is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", f"run_dir={run_dir}", "stages=[pretrain]",
                             *TINY, *overrides], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    record = run_dir / "pretrain" / "checkpoints" / f"step_{step:08d}" / "complete.json"
    deadline = time.monotonic() + 300
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    assert record.exists(), "the run ended before its checkpoint"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the launcher starts ranks in their own sessions)."""
    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


RESUME = ("deepspeed=zero2", "precision=fp32", "train.max_steps=16", "train.save_interval=6",
          "train.eval_interval=100", "launch.nproc_per_node=2", "model.dropout=0.1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_run) -> dict[int, float]:
    run_dir = fresh_run(data_run, tmp_path_factory.mktemp("whole"))
    pretrain(run_dir, *RESUME)
    return records(run_dir)


@pytest.mark.parametrize("skip", ["", "rng", "loader"])
def test_resume_after_a_kill_is_bit_exact(tmp_path, data_run, uninterrupted, skip):
    """Killed after step 6's checkpoint, resumed: steps 7..16 equal the uninterrupted run's to the bit;
    with the RNG (dropout) or loader state not restored, they differ."""
    run_dir = fresh_run(data_run, tmp_path)
    kill_after_checkpoint(run_dir, RESUME, step=6)
    env = {"PIPELINE_TEST_SKIP_RESTORE": skip} if skip else None
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *RESUME, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert records(run_dir, "resumed_from") == {6: str(run_dir.resolve() / "pretrain" / "checkpoints" / "step_00000006")}
    resumed = records(run_dir)
    after = range(7, 17)
    if skip:
        assert [resumed[s] for s in after] != [uninterrupted[s] for s in after]
    else:
        assert [resumed[s] for s in after] == [uninterrupted[s] for s in after]


def test_bad_training_config_gives_one_error_line(tmp_path, data_run):
    import torch

    run_dir = fresh_run(data_run, tmp_path)
    cases = [(("train.global_batch_size=6", "launch.nproc_per_node=2"), "not a multiple"),
             (("train.seq_len=4096",), "exceeds model.max_seq_len")]
    if not torch.cuda.is_available():
        cases.append((("precision=fp16",), "precision=fp16 is not supported"))
    for overrides, phrase in cases:
        proc = pretrain(run_dir, *overrides, check=False)
        assert proc.returncode != 0
        assert len(error_lines(proc)) == 1 and phrase in error_lines(proc)[0], proc.stderr[-3000:]


def unigram_entropy(run_dir: Path) -> float:
    """Entropy (nats) of the train tokens' unigram distribution: the loss of a model that ignores context."""
    from pipeline.data import open_split

    stream = open_split(run_dir / "shards", "train", run_dir / "tokenizer" / "tokenizer.model", verify="off")
    counts = np.bincount(stream.read(0, stream.num_tokens)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_the_built_in_corpus_is_learned_well_below_unigram_entropy(tmp_path):
    proc = run_cli(f"run_dir={tmp_path}", "stages=[tokenize,shard,pretrain]", "model=tiny",
                   "train.max_steps=100", "train.eval_interval=50", "train.save_interval=100")
    assert proc.returncode == 0, proc.stderr[-4000:]
    val = records(tmp_path, "val_loss")
    entropy = unigram_entropy(tmp_path)
    assert val[50] > val[100]
    assert val[100] < 0.5 * entropy, (val, entropy)
