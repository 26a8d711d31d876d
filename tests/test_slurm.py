"""The SLURM scripts on a real two-node SLURM (tests/slurm_cluster.py: slurmctld and slurmd n1, n2 on this
machine), through the user's own commands: `sbatch launch/slurm.sbatch RUN_DIR OVERRIDES` and the shard job
array of README. Time limits, preemption, requeue, job arrays and a lost node, as a cluster does them.

Job identity these tests rely on: a requeued job keeps its SLURM_JOB_ID (and its log, --open-mode=append);
SLURM_RESTART_COUNT (scontrol's Restarts) counts its starts after the first."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ROOT, SMALL_RUN, TINY, fresh_run, records, split_documents

pytestmark = pytest.mark.slow

STEPS = 150  # long enough (seconds) to be interrupted mid-run, short enough to finish soon
TRAIN = (*TINY, "deepspeed=zero2", "precision=fp32", "launch.nproc_per_node=1", f"train.max_steps={STEPS}",
         f"train.eval_interval={STEPS}", f"train.save_interval={STEPS}")
# no GPUs, 2 CPUs per node here: the script's #SBATCH defaults ask for 8 GPUs and 32 CPUs per node
SBATCH = ("--gpus-per-node=0", "--cpus-per-task=1")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}
# runs meant to train until the test stops them: their planned steps would repeat the small corpus far past the
# data.max_repetitions check, which is not what these tests are about
UNTIL_STOPPED = ("data.max_repetitions=100000000",)


def data(corpus: Path) -> tuple[str, ...]:
    return (f"data.paths=[{corpus}]", *SMALL_RUN[:-1])


class Job:
    """One submitted job: its id, its log (--output) and its state as scontrol shows it."""

    def __init__(self, cluster, log: Path, *args: str, env: dict | None = None):
        self.cluster, self.log = cluster, log
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        job_env = {**base, "PATH": path, "WANDB_MODE": "disabled", **cluster.env, **(env or {})}
        proc = cluster.client("sbatch", "--parsable", f"--output={log}", *args, env=job_env)
        self.id = proc.stdout.strip().split(";")[0]
        self.submitted = time.monotonic()

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def wait_for(self, ready, timeout: float, what: str) -> float:
        """Poll until `ready(log text)`; returns the time it first held."""
        deadline = time.monotonic() + timeout
        while not ready(self.text()):
            assert time.monotonic() < deadline, f"job {self.id}: no {what} within {timeout} s: {self.text()[-3000:]}"
            assert self.info()["JobState"] not in DONE, f"job {self.id} ended before {what}: {self.text()[-3000:]}"
            time.sleep(0.05)
        return time.monotonic()

    def finish(self, timeout: float = 240) -> dict[str, str]:
        return finished(self.cluster, self.id, timeout, self.text)


def finished(cluster, job_id: str, timeout: float = 240, text=lambda: "") -> dict[str, str]:
    """Wait for a job (or one array task, "ID_N") to end; a job that does not is cancelled."""
    deadline = time.monotonic() + timeout
    while (info := cluster.job(job_id))["JobState"] not in DONE:
        if time.monotonic() > deadline:
            cluster.client("scancel", job_id, check=False)
            pytest.fail(f"job {job_id} still {info['JobState']} after {timeout} s: {text()[-3000:]}")
        time.sleep(0.2)
    return info


def sbatch_run(cluster, log: Path, run_dir: Path, *overrides: str, options: tuple = (), env: dict | None = None) -> Job:
    return Job(cluster, log, *SBATCH, *options, str(ROOT / "launch" / "slurm.sbatch"), str(run_dir), *overrides,
               env=env)


def at_step(step: int):
    return lambda text: re.search(rf"^pretrain: step={step} loss=", text, re.M) is not None


def losses(run_dir: Path) -> list[float]:
    curve = records(run_dir)
    return [curve[s] for s in sorted(curve)]


@pytest.fixture(scope="module")
def trained(slurm_cluster, small_corpus, tmp_path_factory) -> Path:
    """Item 1, and the uninterrupted reference of the others: tokenize, shard, pretrain, export on 2 nodes × 1 rank."""
    run_dir = tmp_path_factory.mktemp("slurm-run") / "run"
    job = sbatch_run(slurm_cluster, run_dir.with_name("job.log"), run_dir, *data(small_corpus),
                     "stages=[tokenize,shard,pretrain,export]", *TRAIN)
    info = job.finish()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job.text()[-4000:]
    return run_dir


def test_two_nodes_run_every_stage_and_the_export_loads(trained):
    import torch
    from transformers import AutoModelForCausalLM

    text = (trained.with_name("job.log")).read_text()
    for node, name in ((0, "n1"), (1, "n2")):
        assert (f"slurm: node {node} of 2 ({name}): 1 ranks of 2 (ranks per node from launch.nproc_per_node=1), "
                f"rendezvous slurm-") in text, text[-3000:]
    assert "2 ranks × micro batch 2" in text and "run finished: artifacts in" in text
    assert sorted(records(trained)) == list(range(1, STEPS + 1))
    model = AutoModelForCausalLM.from_pretrained(trained / "export" / "pretrain", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()


def starts(text: str) -> list[str]:
    """The job log split at each start of the batch script (a requeued job appends to it)."""
    return re.split(r"^slurm: job \d+, start \d+, ", text, flags=re.M)[1:]


def preempted_at(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^(?:warning: )?pretrain: preempted at step (\d+); checkpoint", text, re.M)]


def test_usr1_then_a_scheduler_requeue_checkpoint_requeue_and_resume_with_the_same_losses(slurm_cluster, trained,
                                                                                            tmp_path):
    """One job, three starts. `scancel --signal=USR1 --batch` (what --signal=B:USR1@120 does near the time
    limit): the ranks checkpoint, the script requeues the job. Then `scontrol requeue` (a scheduler's
    preemption: SIGTERM to every process of the job): checkpoint at the step reached, SLURM requeues it.
    The third start finishes with the losses of the uninterrupted run (fp32)."""
    run_dir = fresh_run(trained, tmp_path / "run")
    job = sbatch_run(slurm_cluster, tmp_path / "job.log", run_dir, "stages=[pretrain]", *TRAIN)
    job.wait_for(at_step(3), 120, "step 3")
    signalled = time.monotonic()
    slurm_cluster.client("scancel", "--signal=USR1", "--batch", job.id)
    first_new = job.wait_for(lambda t: len(starts(t)) > 1 and "pretrain: step=" in starts(t)[1], 180,
                             "a step after the requeue")
    print(f"\nfigure: scancel --signal=USR1 to the requeued job's first new step: {first_new - signalled:.1f} s")
    stopped = preempted_at(starts(job.text())[0])
    assert len(stopped) == 1 and 0 < stopped[0] < STEPS - 20, job.text()[-3000:]
    job.wait_for(lambda t: len(starts(t)) > 1 and at_step(stopped[0] + 3)(starts(t)[1]), 120, "3 more steps")
    slurm_cluster.client("scontrol", "requeue", job.id)
    info = job.finish()
    text = job.text()
    first, second, third = starts(text)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text[-4000:]
    assert "slurm: SIGUSR1, time limit near: checkpointing" in first and "slurm: requeueing job" in first
    assert first.count("passing SIGUSR1 to the ranks") == 2, first[-3000:]  # once per node
    assert "slurm: SIGTERM: waiting for the ranks to checkpoint" in second and "requeueing" not in second
    again = preempted_at(second)
    assert len(again) == 1 and again[0] > stopped[0] and not preempted_at(third), text[-4000:]
    checkpoints = run_dir / "pretrain" / "checkpoints"
    for start, step in ((second, stopped[0]), (third, again[0])):
        assert f"pretrain: resumed from {checkpoints / f'step_{step:08d}'} at step {step}\n" in start, start[-3000:]
    assert sorted(records(run_dir)) == sorted(records(trained))
    np.testing.assert_allclose(losses(run_dir), losses(trained), rtol=1e-6, atol=0)


def test_a_lost_node_ends_the_job_within_the_step_timeout_naming_it(slurm_cluster, trained, tmp_path):
    run_dir = fresh_run(trained, tmp_path / "run")
    timeout_s = 40
    job = sbatch_run(slurm_cluster, tmp_path / "job.log", run_dir, "stages=[pretrain]", *TRAIN,
                     "train.max_steps=100000", *UNTIL_STOPPED, f"launch.step_timeout_s={timeout_s}",
                     options=("--no-requeue",))
    job.wait_for(at_step(3), 120, "step 3")
    ranks = [p for p in psutil.process_iter(["cmdline", "environ"])
             if (p.info["environ"] or {}).get("SLURM_JOB_ID") == job.id
             and (p.info["environ"] or {}).get("SLURMD_NODENAME") == "n2"
             and "pipeline" in (p.info["cmdline"] or []) and not any("torchrun" in a for a in p.info["cmdline"])]
    assert len(ranks) == 1, [p.info["cmdline"] for p in ranks]
    killed = time.monotonic()
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    info = job.finish(timeout=timeout_s + 60)
    ended = time.monotonic() - killed
    text = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", text[-4000:]
    assert ended < timeout_s, (ended, text[-4000:])
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors and re.search(r"rank 1\b", errors[-1]) and "n2" in errors[-1], text[-4000:]


def test_the_shard_job_array_chain_with_a_failed_part_rerun(slurm_cluster, small_run, small_corpus, tmp_path):
    """README's chain: tokenize → --array of 4 parts (--dependency) → merge; part 2 fails, is rerun alone."""
    run_dir, logs, script = tmp_path / "run", tmp_path / "logs", str(ROOT / "launch" / "shard_array.sbatch")
    logs.mkdir()
    tokenize = Job(slurm_cluster, logs / "tok.log", "--cpus-per-task=1",
                   f"--wrap=python -m pipeline run_dir={run_dir} stages=[tokenize] {' '.join(data(small_corpus))}")
    # part 2 fails: a file stands where it stages its output (any failure of one task does)
    (run_dir / "shards.parts").mkdir(parents=True)
    (run_dir / "shards.parts" / "w002.tmp").write_text("in the way")
    parts = Job(slurm_cluster, logs / "part-%a.log", "--cpus-per-task=1", f"--dependency=afterok:{tokenize.id}",
                "--array=0-3", script, str(run_dir), "4", *data(small_corpus))
    merge = Job(slurm_cluster, logs / "merge.log", "--cpus-per-task=1", f"--dependency=afterok:{parts.id}",
                script, str(run_dir), "4", *data(small_corpus))
    states = {t: finished(slurm_cluster, f"{parts.id}_{t}")["JobState"] for t in range(4)}
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED"}, states
    assert tokenize.info()["JobState"] == "COMPLETED", tokenize.text()[-3000:]
    deadline = time.monotonic() + 60  # the controller marks it at its next pass over the queue
    while (blocked := merge.info())["Reason"] != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert blocked["JobState"] == "PENDING" and blocked["Reason"] == "DependencyNeverSatisfied", blocked
    assert not (run_dir / "shards").exists()
    slurm_cluster.client("scancel", merge.id)

    (run_dir / "shards.parts" / "w002.tmp").unlink()
    rerun = Job(slurm_cluster, logs / "rerun-%a.log", "--cpus-per-task=1", "--array=2", script, str(run_dir), "4",
                *data(small_corpus))
    merge = Job(slurm_cluster, logs / "merge2.log", "--cpus-per-task=1", f"--dependency=afterok:{rerun.id}",
                script, str(run_dir), "4", *data(small_corpus))
    assert merge.finish()["JobState"] == "COMPLETED", merge.text()[-3000:]
    assert "shard: part 2 of 4" in (logs / "rerun-2.log").read_text()
    merged = json.loads((run_dir / "shards" / "manifest.json").read_text())
    single = json.loads((small_run / "shards" / "manifest.json").read_text())
    assert merged["num_parts"] == 4 and merged["tokenizer_sha256"] == single["tokenizer_sha256"]
    for split in ("train", "val"):
        for key in ("documents", "tokens"):
            assert merged["sources"]["corpus"]["splits"][split][key] == single["sources"]["corpus"]["splits"][split][key]
    merged_docs, single_docs = split_documents(run_dir), split_documents(small_run)
    for split in ("train", "val"):
        assert sorted(map(tuple, merged_docs[split])) == sorted(map(tuple, single_docs[split]))


def test_a_time_limit_checkpoints_and_requeues_before_the_kill(slurm_cluster, trained, tmp_path):
    """--time=1 --signal=B:USR1@30: SLURM signals the batch script 30-60 s in (its timer ticks every 30 s)
    and kills the job 30 s later. A start that was training stops with a checkpoint, one still starting
    (a loaded machine) before its first stage: either way it is requeued before the kill."""
    run_dir = fresh_run(trained, tmp_path / "run")
    job = sbatch_run(slurm_cluster, tmp_path / "job.log", run_dir, "stages=[pretrain]", *TRAIN,
                     "train.max_steps=1000000", *UNTIL_STOPPED, "train.eval_interval=1000000",
                     options=("--time=1", "--signal=B:USR1@30"))
    job.wait_for(lambda t: len(starts(t)) > 1, 200, "a second start")
    slurm_cluster.client("scancel", job.id)
    first = starts(job.text())[0]
    assert "slurm: SIGUSR1, time limit near: checkpointing" in first and "slurm: requeueing job" in first
    stopped = preempted_at(first)
    assert stopped or "preempted before stage pretrain" in first, first[-3000:]
    assert "DUE TO TIME LIMIT" not in first, first[-3000:]  # requeued before SLURM killed it
    assert int(job.info()["Restarts"]) >= 1
    if stopped:
        checkpoint = run_dir / "pretrain" / "checkpoints" / f"step_{stopped[0]:08d}"
        from pipeline.checkpoint.store import verify

        assert verify(checkpoint, digests=True)[0] is not None, verify(checkpoint, digests=True)[1]


def test_a_resubmission_on_one_node_resumes_the_two_node_run(slurm_cluster, trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "stages" / "pretrain.json").unlink()  # as a run preempted at its last checkpoint leaves it
    job = sbatch_run(slurm_cluster, tmp_path / "job.log", run_dir, "stages=[pretrain]", *TRAIN,
                     f"train.max_steps={STEPS + 10}", options=("--nodes=1",))
    info = job.finish()
    text = job.text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert re.search(rf"^pretrain: resumed from \S+ at step {STEPS}$", text, re.M), text[-3000:]
    assert sorted(records(run_dir)) == list(range(1, STEPS + 11))


def test_an_unresolvable_first_node_is_one_error_line_in_the_job_log(slurm_cluster, tmp_path):
    job = sbatch_run(slurm_cluster, tmp_path / "job.log", tmp_path / "run", "stages=[pretrain]", *TRAIN,
                     env={"MASTER_ADDR": "no-such-node.invalid"}, options=("--no-requeue",))
    info = job.finish(timeout=120)
    text = job.text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert info["JobState"] == "FAILED" and errors and "Traceback" not in text, text[-3000:]
    assert all("MASTER_ADDR=no-such-node.invalid does not resolve" in e and "set MASTER_ADDR" in e for e in errors)
