"""The run lock (pipeline/cluster/runlock.py): one job at a time per run_dir; the processes of one job share it; a lock
whose holder is gone is taken over; shard parts of a job array lock only their part."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN, TINY, Launch, error_lines, fresh_run, pretrain_cli, run_in_process

from pipeline.cluster.runlock import RUN_LOCK_ENV, Holder, acquire, job_identity, read_holder, run_lock
from pipeline.errors import PipelineError
from pipeline.layout import RunLayout

HOST = socket.gethostname()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(path: Path, job: str, host: str = HOST, pid: int | None = None, age_s: float = 0) -> Holder:
    holder = Holder(job=job, host=host, pid=os.getpid() if pid is None else pid, started="2026-12-01 10:00:00 UTC")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.__dict__))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return holder


def test_a_second_job_is_refused_until_the_first_releases(tmp_path):
    path = tmp_path / "locks" / "run.lock"
    first = acquire(path, tmp_path, "job-a", leader=True, stale_s=120)
    assert first.owner and read_holder(path)[0].job == "job-a"
    with pytest.raises(PipelineError, match=rf"^run_dir {tmp_path} is in use by job job-a on host {HOST} since "
                                            rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(pid {os.getpid()}\)"):
        acquire(path, tmp_path, "job-b", leader=True, stale_s=120)
    with pytest.raises(PipelineError, match="in use by job job-a"):  # another job's ranks are refused too
        acquire(path, tmp_path, "job-b", leader=False, stale_s=120)
    first.release()
    assert not path.exists()
    second = acquire(path, tmp_path, "job-b", leader=True, stale_s=120)
    assert second.owner and read_holder(path)[0].job == "job-b"
    second.release()


def test_the_processes_of_one_job_share_its_lock(tmp_path):
    """Every rank and node of a torchrun/srun job names the same job; the leader holds the lock, the others join;
    the local ranks our own launcher starts inherit the holder's job."""
    slurm = [{"SLURM_JOB_ID": "4242", "RANK": str(rank), "TORCHELASTIC_RUN_ID": "slurm-4242"} for rank in range(4)]
    assert {job_identity(env) for env in slurm} == {"4242"}
    torchrun = [{"TORCHELASTIC_RUN_ID": "abc", "RANK": str(rank)} for rank in range(2)]
    assert {job_identity(env) for env in torchrun} == {"torchrun-abc"}
    static = [{"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}]
    assert job_identity(static[0]) == "launcher-n1:29500"  # torchrun's default id is the same for every job
    assert job_identity({RUN_LOCK_ENV: "local-x-1", "TORCHELASTIC_RUN_ID": "uuid"}) == "local-x-1"
    assert job_identity({}) == f"local-{HOST}-{os.getpid()}"

    path = tmp_path / "locks" / "run.lock"
    leader = acquire(path, tmp_path, "4242", leader=True, stale_s=120)
    members = [acquire(path, tmp_path, "4242", leader=False, stale_s=120) for _ in range(3)]
    assert leader.owner and not any(m.owner for m in members)
    for member in members:
        member.release()
    assert read_holder(path)[0].job == "4242"  # a member leaving keeps the job's lock
    leader.release()
    assert not path.exists()


def hold_on_ranks(run_dir: str) -> None:
    """One rank of a launch (run_distributed_test sets what torchrun would): inside the lock with its peers."""
    import torch.distributed as dist

    from pipeline.cluster.distributed import LaunchInfo

    rank, layout = LaunchInfo.from_env().rank, RunLayout.of(run_dir)
    with run_lock(layout, 120, leader=rank == 0, part=None) as lock:
        dist.barrier()  # every rank holds it at once
        assert read_holder(layout.run_lock)[0].job == job_identity() == f"launcher-127.0.0.1:{os.environ['MASTER_PORT']}"
        assert lock.owner == (rank == 0)
        dist.barrier()
    dist.barrier()
    assert not layout.run_lock.exists()


@pytest.mark.slow
def test_the_ranks_of_one_launch_hold_the_lock_together(tmp_path):
    from distributed import run_distributed_test

    run_distributed_test(hold_on_ranks, 2, args=(str(tmp_path),), timeout=120)


def test_run_lock_hands_the_job_to_local_ranks_and_releases_on_error(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_LOCK_ENV, raising=False)
    layout = RunLayout.of(tmp_path)
    with pytest.raises(RuntimeError, match="preempted"):
        with run_lock(layout, 120, leader=True, part=None):
            assert os.environ[RUN_LOCK_ENV] == job_identity({})  # what the local ranks it starts inherit
            child = acquire(layout.run_lock, tmp_path, job_identity(), leader=False, stale_s=120)
            assert not child.owner
            raise RuntimeError("preempted")  # any way out of the block releases it
    assert not layout.run_lock.exists() and RUN_LOCK_ENV not in os.environ


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "locks" / "run.lock"
    pid = dead_pid()
    write_lock(path, "job-old", pid=pid)
    with caplog.at_level(logging.WARNING, logger="pipeline.cluster.runlock"):
        lock = acquire(path, tmp_path, "job-new", leader=True, stale_s=120)
    assert lock.owner and read_holder(path)[0].job == "job-new"
    assert f"taking it over from job job-old on host {HOST}" in caplog.text
    assert f"its process (pid {pid}) has exited" in caplog.text
    lock.release()


def test_another_hosts_lock_is_taken_over_once_its_heartbeat_is_stale(tmp_path, caplog):
    path = tmp_path / "locks" / "run.lock"
    write_lock(path, "job-far", host="other-node", pid=1, age_s=5)
    with pytest.raises(PipelineError, match="in use by job job-far on host other-node"):
        acquire(path, tmp_path, "job-new", leader=True, stale_s=120)
    os.utime(path, (time.time() - 300, time.time() - 300))
    with caplog.at_level(logging.WARNING, logger="pipeline.cluster.runlock"):
        lock = acquire(path, tmp_path, "job-new", leader=True, stale_s=120)
    assert "its heartbeat stopped 300 s ago" in caplog.text and lock.owner
    os.utime(path, (time.time() - 300, time.time() - 300))
    lock.start_heartbeat(interval_s=0.05)  # the holder's thread keeps the lease fresh
    time.sleep(0.3)
    assert read_holder(path)[1] < 5
    lock.release()
    assert not path.exists()


def test_a_requeued_job_takes_its_own_lock_back(tmp_path, caplog):
    """SLURM keeps the job id across a requeue: the restart (a new pid, maybe another node) resumes."""
    path = tmp_path / "locks" / "run.lock"
    for host, pid in (("other-node", 1), (HOST, dead_pid())):
        write_lock(path, "777", host=host, pid=pid)  # the first start's lock, left by the preempted holder
        with caplog.at_level(logging.INFO, logger="pipeline.cluster.runlock"):
            lock = acquire(path, tmp_path, "777", leader=True, stale_s=120)
        assert lock.owner and read_holder(path)[0].pid == os.getpid()
        assert "restarted (a requeue): taking its lock back" in caplog.text
        lock.release()
    live = subprocess.Popen(["sleep", "30"])
    try:  # but the same job id twice at once on one host is two commands racing: refused
        write_lock(path, "777", pid=live.pid)
        with pytest.raises(PipelineError, match="in use by job 777"):
            acquire(path, tmp_path, "777", leader=True, stale_s=120)
    finally:
        live.kill()
        live.wait()


def test_shard_parts_of_a_job_array_lock_only_their_part(tmp_path, small_run, small_corpus):
    """Array tasks write their parts of one run_dir at once; a part being written blocks that part and the merge,
    not the other parts; a part whose job died is taken over."""
    run_dir = tmp_path / "run"
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "tokenizer" / "tokenizer.model").write_bytes((small_run / "tokenizer" / "tokenizer.model").read_bytes())
    args = (f"run_dir={run_dir}", f"data.paths=[{small_corpus}]", *SMALL_RUN[:-1], "stages=[shard]",
            "shard.num_workers=2")
    layout = RunLayout.of(run_dir)
    writer = subprocess.Popen(["sleep", "60"])  # array task 0, still writing its part
    try:
        write_lock(layout.part_lock(0), "9001_0", pid=writer.pid)
        proc = run_in_process(*args, "shard.worker_index=1")
        assert proc.returncode == 0, proc.stderr
        refused = run_in_process(*args, "shard.worker_index=0")
        assert refused.returncode != 0
        assert error_lines(refused) == [f"error: shard part 0 of run_dir {run_dir} is in use by job 9001_0 on host "
                                        f"{HOST} since 2026-12-01 10:00:00 UTC (pid {writer.pid}): wait for that job "
                                        f"to end or stop it, or use another run_dir (a lock whose holder is gone is "
                                        f"taken over)"]
        merge = run_in_process(*args)
        assert merge.returncode != 0 and f"error: shard part 0 of run_dir {run_dir} is in use by job 9001_0" in merge.stderr
    finally:
        writer.kill()
        writer.wait()
    proc = run_in_process(*args, "shard.worker_index=0")  # the task's job died: its part is taken over
    assert proc.returncode == 0, proc.stderr
    assert "taking it over from job 9001_0" in proc.stdout + proc.stderr
    merge = run_in_process(*args)
    assert merge.returncode == 0, merge.stderr
    merged = json.loads(layout.manifest.read_text())["sources"]["corpus"]["splits"]
    single = json.loads(RunLayout.of(small_run).manifest.read_text())["sources"]["corpus"]["splits"]
    assert {s: merged[s]["tokens"] for s in merged} == {s: single[s]["tokens"] for s in single}
    assert not list(layout.locks.iterdir())  # every part's lock and the run lock released


@pytest.mark.slow
def test_a_second_launch_on_a_running_run_dir_exits_with_an_error(tmp_path, data_run):
    """Two `python -m pipeline stages=[pretrain]` moments apart on one run_dir: the second is refused, the first
    (its local ranks share its lock) completes, and metrics.jsonl holds one run's records."""
    run_dir = fresh_run(data_run, tmp_path / "run")
    first = Launch(run_dir, ("train.max_steps=6", "launch.nproc_per_node=2"), None, "first")
    layout = RunLayout.of(run_dir)
    deadline = time.monotonic() + 60
    while not layout.run_lock.exists():
        assert first.proc.poll() is None and time.monotonic() < deadline, first.err.read_text()[-2000:]
        time.sleep(0.05)
    holder, _ = read_holder(layout.run_lock)
    second = pretrain_cli(run_dir, "train.max_steps=6", "launch.nproc_per_node=2", check=False)
    assert second.returncode != 0
    assert error_lines(second) == [f"error: run_dir {run_dir} is in use by {holder.describe()}: wait for that job to "
                                   f"end or stop it, or use another run_dir (a lock whose holder is gone is taken "
                                   f"over)"], second.stderr
    assert holder.pid == first.proc.pid and holder.job == f"local-{HOST}-{first.proc.pid}"
    assert first.finish() == 0, first.err.read_text()[-3000:]
    losses = [r["step"] for r in map(json.loads, layout.metrics.read_text().splitlines()) if "loss" in r]
    assert losses == list(range(1, 7))  # one run's records, in order
    assert not layout.run_lock.exists()
