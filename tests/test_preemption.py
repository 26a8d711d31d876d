"""Preemption and failing peers, for real: 2 CPU ranks started by `python -m pipeline` itself, signalled
or killed mid-pretraining (the rank processes are found with psutil). Fast: the agreement the ranks reach,
on 2 ranks without the CLI (run_distributed_test)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, TINY, fresh_run, run_cli
from distributed import run_distributed_test

PREEMPTIBLE = ("train.eval_interval=1000", "train.save_interval=1000", "launch.nproc_per_node=2", "deepspeed=zero2",
               "precision=fp32")
MAX_STEPS = 30


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *PREEMPTIBLE, f"train.max_steps={MAX_STEPS}", *overrides]


class Run:
    """`python -m pipeline` in the background, its output in files (a full pipe would stall the ranks)."""

    def __init__(self, run_dir: Path, args: list[str]):
        self.run_dir = run_dir
        self.out, self.err = run_dir / "stdout.txt", run_dir / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=out, stderr=err,
                                         env={**os.environ, "WANDB_MODE": "disabled"})

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended early:\n{self.err.read_text()[-3000:]}"
            if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                        for line in metrics.read_text().splitlines() if line.strip()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout} s")

    def ranks(self) -> dict[int, psutil.Process]:
        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env = child.environ()
                if "-m" in child.cmdline() and "RANK" in env:
                    found[int(env["RANK"])] = child
            except psutil.NoSuchProcess:
                pass
        assert sorted(found) == [0, 1], found
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.err.read_text()[-3000:]}") from None

    def kill(self) -> None:
        """Cleanup: nothing of this run may outlive the test."""
        try:
            processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "pretrain" / "checkpoints").glob("step_*"))


def steps_logged(run_dir: Path) -> set[int]:
    return {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)}


def assert_preempted_with_one_checkpoint(run: Run) -> int:
    """Exit 0, one complete checkpoint at the step reached, the stage not marked complete; returns the step."""
    from pipeline.checkpoint.store import verify

    stdout, stderr = run.out.read_text(), run.err.read_text()
    assert run.proc.returncode == 0, stderr[-4000:]
    folders = checkpoints(run.run_dir)
    assert len(folders) == 1, folders
    record, problem = verify(folders[0])
    assert record is not None, problem
    step = record["step"]
    assert 3 <= step < MAX_STEPS and record["trainer_state"]["step"] == step
    assert f"preempted at step {step}; checkpoint {folders[0]}; rerun the same command to resume" in stdout
    assert max(steps_logged(run.run_dir)) == step  # every rank stopped there: no step after it was taken
    assert not (run.run_dir / "stages" / "pretrain.json").exists()
    assert not [line for line in stderr.splitlines() if line.startswith("error:")], stderr[-3000:]
    return step


def running_at_step_3(tmp_path, small_run, runs, *overrides) -> Run:
    """A 2-rank pretrain launch on a copy of the small run's data, past its third step."""
    run_dir = fresh_run(small_run, tmp_path)
    run = Run(run_dir, command(run_dir, *overrides))
    runs.append(run)
    run.wait_for_step(3)
    return run


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_all_exits_0_and_the_rerun_resumes(tmp_path, small_run, runs):
    run = running_at_step_3(tmp_path, small_run, runs)
    run_dir, args = run.run_dir, command(run.run_dir)
    run.ranks()[1].send_signal(signal.SIGTERM)  # rank 0 never sees a signal: it must agree all the same
    run.wait(timeout=120)
    step = assert_preempted_with_one_checkpoint(run)

    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {checkpoints(run_dir)[0]} at step {step}" in proc.stdout
    assert steps_logged(run_dir) == set(range(1, MAX_STEPS + 1))
    assert checkpoints(run_dir)[-1].name == f"step_{MAX_STEPS:08d}"
    assert (run_dir / "stages" / "pretrain.json").exists()


@pytest.mark.slow
def test_sigusr1_to_the_launching_process_reaches_the_ranks_and_no_later_stage_runs(tmp_path, small_run, runs):
    # export would run in this very process after pretrain, from the checkpoint the preemption wrote
    run = running_at_step_3(tmp_path, small_run, runs, "stages=[pretrain,export]", "export.source=pretrain")
    run_dir = run.run_dir
    run.ranks()  # both ranks are up
    os.kill(run.proc.pid, signal.SIGUSR1)
    run.wait(timeout=120)
    assert_preempted_with_one_checkpoint(run)
    assert not (run_dir / "export").exists()


@pytest.mark.slow
def test_a_killed_rank_makes_the_others_and_the_launcher_fail_fast(tmp_path, small_run, runs):
    run = running_at_step_3(tmp_path, small_run, runs, "launch.step_timeout_s=20")
    run_dir, ranks = run.run_dir, run.ranks()
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    status = run.wait(timeout=60)
    assert time.monotonic() - killed < 20  # a dead peer is noticed at once, not at the timeout
    stderr = run.err.read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status != 0, stderr[-3000:]
    assert f"error: rank 1 (pid {ranks[1].pid}) was killed by SIGKILL" in stderr, stderr[-3000:]
    assert any("rank 0: a peer rank died or stopped responding" in line and f"pid {ranks[1].pid}" in line
               for line in errors), stderr[-3000:]
    assert not ranks[0].is_running()
    assert not (run_dir / "stages" / "pretrain.json").exists()


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_within_the_step_timeout(tmp_path, small_run, runs):
    """A stopped rank answers nothing: the others give up after launch.step_timeout_s (not the 600 s of
    launch.timeout_s that covered the first step)."""
    run = running_at_step_3(tmp_path, small_run, runs, "launch.step_timeout_s=8")
    ranks = run.ranks()
    ranks[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while ranks[0].is_running() and ranks[0].status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - stopped < 40, "rank 0 still waits for the stopped rank"
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        ranks[1].send_signal(signal.SIGKILL)
    assert 8 <= waited < 40
    assert run.wait(timeout=60) != 0
    errors = [line for line in run.err.read_text().splitlines() if line.startswith("error:")]
    assert any("rank 0: a peer rank died or stopped responding (no answer within 8 s" in line for line in errors), \
        run.err.read_text()[-3000:]


# -- the agreement itself: 2 ranks, no CLI --------------------------------------------------------------
def signal_on_rank_1_stops_both_at_the_stage_boundary() -> None:
    import torch.distributed as dist

    from pipeline.cluster import control

    rank = dist.get_rank()
    control.setup(timeout_s=60, step_timeout_s=60)
    control.install_preemption_handlers(["SIGTERM", "SIGUSR1"])
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # rank 0 never sees a signal: it must stop all the same
    assert control.preempt_requested() == (signal.SIGTERM if rank == 1 else None)
    assert control.agree({"preempt": rank == 1, "other": False}) == {"preempt": True, "other": False}
    with pytest.raises(control.Preempted, match="preempted before stage export"):
        control.stop_if_preempted("export")
    control.shutdown()


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_stage():
    run_distributed_test(signal_on_rank_1_stops_both_at_the_stage_boundary, world_size=2, backend="gloo")


def rank_1_fails() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 says no")
    dist.barrier()  # rank 0 waits for a peer that is gone: the helper must not hang on it


def test_a_failure_on_one_rank_fails_the_test_with_its_traceback():
    """The helper the fast distributed tests rely on: a failing rank is not lost."""
    with pytest.raises(AssertionError, match=r"(?s)-- rank 1 failed first:\nTraceback.*ValueError: rank 1 says no"):
        run_distributed_test(rank_1_fails, world_size=2, timeout=120)
