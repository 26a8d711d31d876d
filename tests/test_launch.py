"""Launch scripts for real, on one machine: two torchrun "nodes", the deepspeed launcher with a hostfile,
the SLURM scripts' node logic (the jobs themselves run on a real SLURM in test_slurm.py). (The run
report's tests are in test_report.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, STEPS, TINY, error_lines, fresh_run, kill_tree, records

from pipeline.cluster.local_launch import _failure, free_port

LAUNCH = ROOT / "launch"


def script_env(**extra: str) -> dict[str, str]:
    """The user's environment for a launch script: this Python's tools first on PATH, wandb off, and
    no SLURM variables of a job the tests themselves might run in."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**base, "PATH": path, "WANDB_MODE": "disabled", **extra}


def run_script(script: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- scripts ----------------------------------------------------------------------------------------

def test_a_killed_rank_is_named_even_when_a_peer_exited_first(tmp_path):
    """The survivor exits (status 2, its own error line) as soon as its peer dies; the agent may see that
    first. The report names the killed rank, the cause; a plain error exit is left to the ranks' own lines."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    missing = str(tmp_path / "no-error-file")
    survivor, killed = ProcessFailure(0, 101, 2, missing), ProcessFailure(1, 102, -signal.SIGKILL, missing)
    survivor.timestamp, killed.timestamp = 100, 101
    failed = _failure(ChildFailedError("pipeline", {0: survivor, 1: killed}))
    assert failed.exit_code == 2 and failed.message.startswith("rank 1 (pid 102) was killed by SIGKILL")
    assert _failure(ChildFailedError("pipeline", {0: survivor})).message is None


def test_every_launch_script_parses():
    scripts = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} >= {"torchrun.sh", "deepspeed.sh", "slurm.sbatch", "slurm_node.sh",
                                         "shard_array.sbatch"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)
        assert os.access(script, os.X_OK), f"{script} is not executable (the README runs them directly)"


def slurm_env(cmd_env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.cluster.distributed slurm-env OVERRIDES` in a fabricated SLURM environment, nothing else set."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **cmd_env}
    return subprocess.run([sys.executable, "-m", "pipeline.cluster.distributed", "slurm-env", *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def exported(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The variables as bash sees them after `eval` (what launch/slurm_node.sh does)."""
    shown = subprocess.run(["bash", "-c", 'eval "$1"; env', "_", proc.stdout], capture_output=True, text=True)
    return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def test_slurm_rank_logic_from_a_fabricated_environment():
    job = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_GPUS_ON_NODE": "4"}
    for node in (0, 1):
        proc = slurm_env({**job, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"})
        assert proc.returncode == 0, proc.stderr
        env = exported(proc)
        assert (env["NODE_RANK"], env["NNODES"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == (str(node), "2", "4", "8")
        assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
        assert env["RDZV_ID"] == "slurm-123456"
    # --gpus-per-node=h100:8 on 3 nodes, node list with several ranges; the user's own choices win
    proc = slurm_env({"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
                      "SLURM_NODELIST": "a100-[10-11,20],cpu1", "SLURM_GPUS_PER_NODE": "h100:8"})
    env = exported(proc)
    assert (env["NODE_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("2", "24", "a100-10")
    proc = slurm_env({**job, "SLURM_NODEID": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000",
                      "NPROC_PER_NODE": "2"})
    env = exported(proc)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["WORLD_SIZE"]) == ("10.0.0.5", "31000", "4")
    proc = slurm_env({"SLURM_JOB_ID": "1"})  # not inside a job step
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "SLURM_NODEID" in proc.stderr


def test_slurm_ranks_per_node_follow_the_override_then_the_environment_then_the_allocation():
    """On a node without GPUs: launch.nproc_per_node, else NPROC_PER_NODE, else the job's tasks per node, else
    its CPUs over --cpus-per-task; the node's line in the job log says which."""
    job = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0",
           "PIPELINE_JOB_NTASKS_PER_NODE": "3", "SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2",
           "SLURM_NTASKS_PER_NODE": "1"}  # the step's own one task per node: never the rank count
    cases = [(job, ("model=tiny", "launch.nproc_per_node=1"), "1", "launch.nproc_per_node=1"),
             ({**job, "NPROC_PER_NODE": "4"}, ("launch.nproc_per_node=0",), "4", "NPROC_PER_NODE"),
             ({**job, "NPROC_PER_NODE": "4"}, ("++launch.nproc_per_node=2",), "2", "launch.nproc_per_node=2"),
             (job, (), "3", "--ntasks-per-node"),
             ({**job, "PIPELINE_JOB_NTASKS_PER_NODE": ""}, (), "4", "--cpus-per-task"),
             ({**job, "SLURM_GPUS_ON_NODE": "8"}, (), "8", "GPUs")]
    for env, overrides, nproc, source in cases:
        proc = slurm_env(env, *overrides)
        assert proc.returncode == 0, proc.stderr
        shown = exported(proc)
        assert shown["NPROC_PER_NODE"] == nproc and source in shown["NPROC_SOURCE"], (overrides, shown)
        assert shown["WORLD_SIZE"] == str(2 * int(nproc))


def test_an_unresolvable_master_addr_is_one_error_line(tmp_path):
    """Not torchrun's pages of rendezvous traceback: the address, and the variable to set."""
    for placement in ({"RDZV_ID": "slurm-5"}, {}):
        proc = run_script("torchrun.sh", "stages=[pretrain]", env=script_env(
            NNODES="2", NODE_RANK="1", NPROC_PER_NODE="1", MASTER_ADDR="no-such-node.invalid", **placement))
        assert proc.returncode == 2 and error_lines(proc) == proc.stderr.strip().splitlines(), proc.stderr
        assert "MASTER_ADDR=no-such-node.invalid does not resolve" in proc.stderr and "set MASTER_ADDR" in proc.stderr


def test_slurm_scripts_refuse_bad_usage_in_one_line(tmp_path):
    job = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
    cases = [("slurm.sbatch", [str(tmp_path)], {}, "not inside a SLURM job"),
             ("slurm.sbatch", ["model=tiny"], job, "no run_dir"),
             ("slurm.sbatch", [str(tmp_path)], {**job, "SLURM_SUBMIT_DIR": str(tmp_path)}, "not the pipeline checkout"),
             ("shard_array.sbatch", [str(tmp_path)], {}, "usage"),
             ("shard_array.sbatch", [str(tmp_path), "0"], {}, "usage")]
    for script, args, env, phrase in cases:
        proc = run_script(script, *args, env={**script_env(), **env})
        assert proc.returncode != 0 and len(error_lines(proc)) == 1 and phrase in proc.stderr, (script, args, proc.stderr)


def test_deepspeed_launcher_variables_are_read():
    from pipeline.cluster.distributed import LaunchInfo

    # deepspeed.launcher.launch sets LOCAL_SIZE, not torchrun's LOCAL_WORLD_SIZE
    info = LaunchInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                                "MASTER_ADDR": "node-0", "MASTER_PORT": "29500"})
    assert info == LaunchInfo(rank=3, world_size=4, local_rank=1, local_world_size=2, under_launcher=True)


def test_deepspeed_script_command_line(tmp_path):
    proc = run_script("deepspeed.sh", "stages=[pretrain]", env=script_env(DRY_RUN="1", NPROC_PER_NODE="3"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["deepspeed", "--master_port", "29500", "--hostfile", "/dev/null", "--num_gpus",
                                   "3", "--no_local_rank", "--module", "pipeline", r"stages=\[pretrain\]"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    proc = run_script("deepspeed.sh", "model=1b", env=script_env(
        DRY_RUN="1", HOSTFILE=str(hostfile), MASTER_ADDR="node-a", MASTER_PORT="29700",
        DEEPSPEED_ARGS="--launcher openmpi"))
    assert proc.stdout.split() == ["deepspeed", "--master_port", "29700", "--hostfile", str(hostfile), "--master_addr",
                                   "node-a", "--launcher", "openmpi", "--no_local_rank", "--module", "pipeline", "model=1b"]
    proc = run_script("deepspeed.sh", env=script_env(HOSTFILE=str(tmp_path / "missing")))
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "HOSTFILE" in proc.stderr


# -- multi-process launches -------------------------------------------------------------------------

def curve(run_dir: Path) -> dict[int, float]:
    """Train losses by step, val losses by minus the step."""
    return {**records(run_dir), **{-s: v for s, v in records(run_dir, "val_loss").items()}}


@pytest.fixture(scope="module")
def one_node_curve(two_local_ranks) -> dict[int, float]:
    """The reference: conftest's two_local_ranks, 2 local ranks started by the pipeline itself (not under a
    launcher); the fixture checks its report and that the local ranks left the report to the launching process."""
    return curve(two_local_ranks)


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_node_with_two_ranks(tmp_path, small_run, one_node_curve):
    run_dir = fresh_run(small_run, tmp_path)
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), f"run_dir={run_dir}", "stages=[pretrain]", *TINY,
                               *STEPS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=script_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # timed out: leave nothing running
                kill_tree(node.pid)
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-4000:]
    assert "2 ranks ×" in outputs[0][0]  # what the training loop saw
    assert "run finished: artifacts in" in outputs[0][0] and "run finished" not in outputs[1][0]
    assert sorted(curve(run_dir)) == sorted(one_node_curve)
    np.testing.assert_allclose([curve(run_dir)[k] for k in sorted(one_node_curve)],
                               [one_node_curve[k] for k in sorted(one_node_curve)], rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_deepspeed_launcher_with_a_hostfile_trains_like_local_ranks(tmp_path, small_run, one_node_curve):
    run_dir = fresh_run(small_run, tmp_path / "run")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # one host: no ssh; the ranks get RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from deepspeed
    env = script_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     DEEPSPEED_ARGS="--no_ssh_check")
    proc = run_script("deepspeed.sh", f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *STEPS, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 ranks ×" in proc.stdout
    np.testing.assert_allclose([curve(run_dir)[k] for k in sorted(one_node_curve)],
                               [one_node_curve[k] for k in sorted(one_node_curve)], rtol=2e-5, atol=2e-5)
    assert (run_dir / "report" / "report.md").is_file()


def test_a_signal_that_came_while_the_rank_was_starting_is_acted_on(tmp_path, monkeypatch):
    """launch/torchrun.sh writes the signal's name before it passes the signal on; a rank that had no handler
    yet (SLURM's --signal can come during startup) takes it from there once its handlers are in place."""
    from pipeline.cluster import control

    sent = tmp_path / "signalled"
    sent.write_text("SIGUSR1\n")
    monkeypatch.setenv(control.SIGNALLED_FILE_ENV, str(sent))
    monkeypatch.setattr(control, "_requested", None)
    saved = signal.getsignal(signal.SIGUSR1)
    try:
        control.install_preemption_handlers(["SIGUSR1"])
        assert control.preempt_requested() == signal.SIGUSR1
        monkeypatch.setattr(control, "_requested", None)
        sent.write_text("SIGHUP\n")  # not one of this run's preemption signals
        control.install_preemption_handlers(["SIGUSR1"])
        assert control.preempt_requested() is None
    finally:
        signal.signal(signal.SIGUSR1, saved)
