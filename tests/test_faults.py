"""Faults, for real: ranks SIGKILLed at many instants (inside checkpoint saves too), checkpoint files
truncated or corrupted, NaN losses and loss spikes injected on one rank. 2 CPU ranks, the `tiny` model,
through `python -m pipeline`. Test hooks: PIPELINE_TEST_KILL_IN_SAVE, PIPELINE_TEST_NAN_AT."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import (
    RESUME,
    ROOT,
    TINY,
    Launch,
    checkpoint_copy,
    checkpoints,
    error_lines,
    fresh_run,
    kill_tree,
    records,
    run_cli,
    run_on_ranks,
    same_state,
    skip_records,
    tensors,
)

from pipeline.checkpoint.store import RECORD, find_resumable, prune, tag_for, verify


def newest_good_step(run_dir: Path) -> int | None:
    found = find_resumable(checkpoints(run_dir), digests=True)
    return found[1]["step"] if found else None


# -- the kill matrix ----------------------------------------------------------------------------------
MATRIX = RESUME  # conftest: fp32, 12 steps, a checkpoint each step (the last 2 kept), dropout 0.1


def truncate_a_shard(run_dir: Path, step: int) -> str:
    folder = checkpoints(run_dir) / tag_for(step)
    victim = sorted(folder.glob("*optim_states.pt"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim.name


def flip_a_byte(run_dir: Path, step: int) -> str:
    """Same size, different content: only the sha256 in the record can tell."""
    folder = checkpoints(run_dir) / tag_for(step)
    victim = sorted(folder.glob("*optim_states.pt"))[0]
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return victim.name


def exists(path: Path) -> Callable[[], bool]:
    return path.exists


def logged(run_dir: Path, step: int) -> Callable[[], bool]:
    def check() -> bool:
        try:  # the run appends while we read: a torn last line is not there yet
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            return any(json.loads(line).get("step") == step for line in lines[:-1])
        except (OSError, ValueError):
            return False
    return check


# Each entry: how the launch dies (a save hook STEP:POINT[:RANK], or an outside SIGKILL of the whole
# process tree once a condition holds), the step it must then resume from (outside kills race with the
# saves: whichever checkpoint verifies newest), and damage done to that checkpoint before the next
# launch, which must then fall back to the one before it with a warning naming the damaged file.
KILLS = {
    "zero2": [
        {"outside": lambda d: exists(checkpoints(d) / tag_for(2) / RECORD)},  # step 3 under way (or its save)
        {"hook": "5:shards:1", "resume": 4},  # rank 1 dies with its shards written, rank 0 in the barrier
        {"hook": "7:record", "resume": 6},  # every shard durable, no completion record yet
        {"hook": "8:pointer", "resume": 8, "damage": truncate_a_shard},  # complete, `latest` still at 7
        {"outside": lambda d: exists(checkpoints(d) / tag_for(10))},  # while DeepSpeed writes step 10
    ],
    "zero3": [
        {"hook": "3:shards:0", "resume": 2},
        {"outside": lambda d: logged(d, 5)},  # step 5 logged: its save or step 6 under way
        {"hook": "7:prune", "resume": 7, "damage": flip_a_byte},  # step 7 complete, pointer moved
        {"hook": "9:record:0", "resume": 8},
        {"outside": lambda d: exists(checkpoints(d) / tag_for(11))},
    ],
}


def kill_chain(run_dir: Path, zero: str) -> int:
    """The launches of one ZeRO stage's chain in one run directory; returns the kills survived."""
    overrides = (f"deepspeed={zero}", *MATRIX)
    expected_resume: int | None = None
    damaged: tuple[str, str] | None = None  # (checkpoint tag, file) the next launch must warn about
    survived = 0
    for number, kill in enumerate([*KILLS[zero], None]):
        env = {"PIPELINE_TEST_KILL_IN_SAVE": kill["hook"]} if kill and "hook" in kill else None
        launch = Launch(run_dir, overrides, env, f"launch{number}")
        code = launch.finish(kill_when=kill["outside"](run_dir) if kill and "outside" in kill else None)
        if expected_resume is not None:
            assert f"resumed from {checkpoints(run_dir) / tag_for(expected_resume)} at step" in launch.stdout, \
                (zero, number, expected_resume, launch.stdout[-3000:])
        if damaged is not None:
            warning = next((line for line in launch.stdout.splitlines() if f"{damaged[0]} skipped" in line), "")
            assert damaged[1] in warning, (zero, damaged, launch.stdout[-3000:])
            damaged = None
        if kill is None:
            assert code == 0, launch.err.read_text()[-3000:]
            return survived
        assert code != 0, f"{zero}: launch {number} ended before its kill {kill}"
        expected_resume = newest_good_step(run_dir)
        assert expected_resume is not None and expected_resume == kill.get("resume", expected_resume), \
            (zero, kill, expected_resume)
        survived += 1
        if "damage" in kill:  # the newest checkpoint goes bad: the next launch falls back to the one before
            damaged = (tag_for(expected_resume), kill["damage"](run_dir, expected_resume))
            expected_resume = newest_good_step(run_dir)
            assert expected_resume == kill["resume"] - 1, (zero, expected_resume)
    raise AssertionError("unreachable")


@pytest.mark.slow
@pytest.mark.fault
def test_kill_matrix_resumes_bit_exact(tmp_path, data_run, uninterrupted):
    """ZeRO 2 and ZeRO 3, each a chain of launches in one run directory, killed again and again (outside
    SIGKILLs of the whole process tree; a rank SIGKILLing itself at each point of a checkpoint save), the
    newest checkpoint damaged twice (truncated; one byte flipped): after every kill `train.resume=auto`
    resumes from the newest checkpoint that verifies, and the final loss curve equals an uninterrupted
    run's to the bit. The chains overlap each other and the uninterrupted runs (conftest's `uninterrupted`,
    in the background; test_pretrain's resume tests compare against the same runs): on 2 cores each launch
    mostly waits."""
    started = time.monotonic()
    references = {zero: uninterrupted(zero) for zero in KILLS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        chains = {zero: pool.submit(kill_chain, fresh_run(data_run, tmp_path / f"{zero}-killed"), zero)
                  for zero in KILLS}
        survived = {zero: future.result() for zero, future in chains.items()}
    reference_dirs = {zero: future.result() for zero, future in references.items()}
    for zero in KILLS:
        run_dir, reference_dir = tmp_path / f"{zero}-killed", reference_dirs[zero]
        resumed, reference = records(run_dir), records(reference_dir)
        assert sorted(resumed) == list(range(1, 13))
        assert [resumed[s] for s in range(1, 13)] == [reference[s] for s in range(1, 13)], zero
        assert records(run_dir, "val_loss") == records(reference_dir, "val_loss")
    tried = sum(len(kills) for kills in KILLS.values())
    print(f"\nkill matrix: {sum(survived.values())}/{tried} kills survived "
          f"({', '.join(f'{z}: {n}' for z, n in survived.items())}) in {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.fault
def test_an_explicit_resume_folder_must_verify(tmp_path, uninterrupted):
    """train.resume=<folder> whose record does not verify (one byte of a shard flipped) is refused with
    one error line before DeepSpeed unpickles anything; a folder that verifies resumes (run_on_ranks). The
    checkpoints are
    conftest's `uninterrupted` run's up to step 3 (written without the writer thread, train.async_checkpoint
    =false; the other runs use it), and so are the two written here."""
    run_dir = checkpoint_copy(uninterrupted("zero2").result(), tmp_path / "run", step=3)
    common = (f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "deepspeed=zero2", *RESUME,
              "train.async_checkpoint=false")
    bad_file = flip_a_byte(run_dir, 3)
    bad, good = checkpoints(run_dir) / tag_for(3), checkpoints(run_dir) / tag_for(2)
    proc = run_cli(*common, "train.max_steps=4", f"train.resume={bad}")
    assert proc.returncode != 0 and len(error_lines(proc)) == 1, proc.stderr[-3000:]
    assert f"refusing to resume from {bad}: {bad_file} is corrupted" in error_lines(proc)[0]
    logged = run_on_ranks(*common, "train.max_steps=4", f"train.resume={good}")  # no error line to check
    assert f"resumed from {good} at step 2" in logged and sorted(records(run_dir)) == [1, 2, 3, 4]


# -- non-finite losses and loss spikes ----------------------------------------------------------------
NUMERICS = ("precision=fp32", "train.max_steps=10", "train.save_interval=1", "train.keep_last=20",
            "train.eval_interval=100", "launch.nproc_per_node=2")


@pytest.mark.slow
@pytest.mark.fault
def test_nan_loss_on_one_rank_skips_the_update_on_every_rank_until_too_many(tmp_path, data_run):
    """ZeRO 0 (plain AdamW: nothing in DeepSpeed would catch it): rank 1's loss is NaN at step 3, rank 0's
    at steps 6-8. Every rank skips those updates (weights and Adam state stay as they were, training goes
    on), and the third skip in a row (train.max_nonfinite_skips=2) stops the run with one error line."""
    run_dir = fresh_run(data_run, tmp_path)
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *NUMERICS, "deepspeed=zero0",
                   "train.max_nonfinite_skips=2", env={"PIPELINE_TEST_NAN_AT": "3:1,6-8:0"})
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "3 updates in a row skipped, the last at step 8" in errors[0] and "max_nonfinite_skips=2" in errors[0]
    assert f"the last good checkpoint is {checkpoints(run_dir) / tag_for(7)}" in errors[0]
    assert "rank 1: pretrain: 3 updates in a row skipped, the last at step 8" in proc.stderr  # the same decision
    skips = skip_records(run_dir)
    assert sorted(skips) == [3, 6, 7, 8] and {r["skipped_update"] for r in skips.values()} == {"non-finite loss"}
    assert [skips[s]["nonfinite_skips"] for s in (3, 6, 7, 8)] == [1, 2, 3, 4]
    losses = records(run_dir)
    assert sorted(losses) == [1, 2, 4, 5] and all(map(math.isfinite, losses.values()))
    model = "mp_rank_00_model_states.pt"  # ZeRO 0: the weights and AdamW's state, identical on every rank
    assert same_state(run_dir, 2, 3, model) and same_state(run_dir, 5, 7, model)
    assert not same_state(run_dir, 3, 4, model)
    last = tensors(checkpoints(run_dir) / tag_for(7) / model)
    assert all(torch.isfinite(t).all() for t in last if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.fault
def test_loss_spike_is_skipped_and_nonfinite_stop_stops(tmp_path, data_run):
    """ZeRO 3: rank 0's loss ×1000 at step 5 (finite: DeepSpeed would apply it) is skipped by the spike
    guard on every rank's partition; a NaN loss on rank 1 at step 7 with train.nonfinite=stop ends the run
    with one error line naming the step and the last good checkpoint."""
    run_dir = fresh_run(data_run, tmp_path)
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *NUMERICS, "deepspeed=zero3",
                   "train.spike_threshold=5", "train.spike_window=3", "train.nonfinite=stop",
                   env={"PIPELINE_TEST_NAN_AT": "5:0:1000,7:1"})
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "non-finite loss at step 7 (train.nonfinite=stop)" in errors[0]
    assert f"the last good checkpoint is {checkpoints(run_dir) / tag_for(6)}" in errors[0]
    assert "rank 1: pretrain: non-finite loss at step 7" in proc.stderr
    skips = skip_records(run_dir)
    assert sorted(skips) == [5, 7] and skips[5]["skipped_update"].startswith("loss spike")
    assert skips[5]["spike_skips"] == 1 and skips[7]["nonfinite_skips"] == 1
    assert sorted(records(run_dir)) == [1, 2, 3, 4, 6]
    partitions = "*optim_states.pt"  # each rank's fp32 partition and its Adam moments
    assert same_state(run_dir, 4, 5, partitions) and not same_state(run_dir, 5, 6, partitions)


# -- checkpoint records, pruning: fast -----------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    """A checkpoint folder with a record as save_checkpoint writes it (sizes and sha256)."""
    import hashlib

    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    files = files or {"model.pt": b"weights" * 10, "rng_rank00000.pt": b"rng"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / RECORD).write_text(json.dumps({
        "step": step, "world_size": 1, "trainer_state": {}, "files": {n: len(d) for n, d in files.items()},
        "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}))
    return folder


def test_a_corrupted_file_is_caught_by_its_sha256_and_resume_falls_back(tmp_path, caplog):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    data = bytearray((newest / "model.pt").read_bytes())
    data[3] ^= 1
    (newest / "model.pt").write_bytes(bytes(data))
    assert verify(newest)[0] is not None  # the sizes still match: the cheap check can't tell
    record, problem = verify(newest, digests=True)
    assert record is None and "model.pt is corrupted" in problem
    folder, record = find_resumable(tmp_path, digests=True)
    assert record["step"] == 1 and f"{newest} skipped: model.pt is corrupted" in caplog.text
    legacy = fake_checkpoint(tmp_path, 3)  # a record from before sha256 was recorded: sizes only
    record = json.loads((legacy / RECORD).read_text())
    del record["sha256"]
    (legacy / RECORD).write_text(json.dumps(record))
    assert find_resumable(tmp_path, digests=True)[1]["step"] == 3
    (legacy / RECORD).write_text("[1, 2]")
    assert "malformed completion record" in verify(legacy)[1]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """After a resume from an older folder, the checkpoint just written is not the newest by step; with
    keep_last=1 the old rule kept only the newest by step and deleted the one good checkpoint of this run.
    Leftovers of cut-short saves older than it go."""
    for step in (2, 9):
        fake_checkpoint(tmp_path, step)
    (tmp_path / tag_for(3)).mkdir()  # a save that never completed
    (tmp_path / tag_for(3) / "model.pt").write_bytes(b"half")
    broken = fake_checkpoint(tmp_path, 4)  # a prune cut short: the record outlived a file
    (broken / "model.pt").unlink()
    current = fake_checkpoint(tmp_path, 5)
    (tmp_path / tag_for(12)).mkdir()  # newer than the current one: not ours to judge
    prune(tmp_path, keep_last=1, current=current)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(5), tag_for(9), tag_for(12)]
    prune(tmp_path, keep_last=0, current=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(9), tag_for(12)]

