"""A real two-node SLURM on this machine, for the tests: munge, slurmctld and two slurmd (nodes n1 and n2).

Everything lives in one temporary folder (config, munge key and socket, state, spool, logs); clients find it
through SLURM_CONF (`SlurmCluster.env`). What makes one machine host two nodes (found by trying, SLURM 22.05):
both nodes have NodeHostname= this machine and NodeAddr=127.0.0.1 with a port each; slurmd's spool, pid and
log files are per node (%n), or the second slurmd stops the first; proctrack/linuxproc and task/none need no
cgroups; the node names resolve (an /etc/hosts line), since the job's first node becomes MASTER_ADDR.
A requeued job waits cred_expire seconds before it may start again (SLURM's default: 120); 10 here.
Runs as root (SlurmUser=root), as CI and the test machines do.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
PACKAGES = "slurm-wlm and munge (apt-get install slurm-wlm munge)"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # pipeline test cluster (tests/slurm_cluster.py)\n"


def missing_reason() -> str | None:
    """Why this machine cannot host the test cluster, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): install {PACKAGES}"
    if os.geteuid() != 0:
        return f"the test cluster runs its daemons as root (SlurmUser=root); this user is uid {os.geteuid()}"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(n: int) -> list[int]:
    from pipeline.cluster.local_launch import free_port

    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def ensure_hosts_entry(hosts: Path = Path("/etc/hosts")) -> None:
    """n1 and n2 resolve to 127.0.0.1 (added once; kept, so that parallel sessions never race on removal)."""
    if all(_resolves(node) for node in NODES):
        return
    with open(hosts, "a") as out:
        out.write(HOSTS_LINE)


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class SlurmCluster:
    """start() brings up munge, the controller and both nodes and waits until the nodes are idle; stop() ends
    every daemon it started (and any job still running)."""

    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root, self.cpus = root, cpus_per_node
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, scontrol, ...) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _config(self) -> str:
        ctld, *node_ports = free_ports(1 + len(NODES))
        host = socket.gethostname().split(".")[0]
        nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                        f"RealMemory=1000 State=UNKNOWN\n" for name, port in zip(NODES, node_ports))
        r = self.root
        return (f"ClusterName=pipelinetest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld}\n"
                "SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\n"
                f"AuthInfo=socket={self.munge_socket},cred_expire=10\n"
                f"StateSaveLocation={r}/state\nSlurmctldPidFile={r}/slurmctld.pid\nSlurmctldLogFile={r}/slurmctld.log\n"
                f"SlurmdSpoolDir={r}/spool/%n\nSlurmdPidFile={r}/slurmd-%n.pid\nSlurmdLogFile={r}/slurmd-%n.log\n"
                "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
                "SelectTypeParameters=CR_CPU\nReturnToService=2\nJobRequeue=1\nMpiDefault=none\n"
                "SchedulerType=sched/backfill\nSchedulerParameters=sched_interval=1\n"
                "SlurmctldDebug=info\nSlurmdDebug=info\nKillWait=30\nMinJobAge=300\nInactiveLimit=0\n"
                "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
                f"{nodes}PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP\n")

    def _daemon(self, *command: str) -> None:
        log = open(self.root / f"{Path(command[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **self.env}, start_new_session=True))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_hosts_entry()
        for folder in ("munge", "state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(self._config())
        m = self.root / "munge"
        self._daemon(_tool("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                     f"--seed-file={m}/munged.seed")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not open its socket")
        self._daemon(_tool("slurmctld"), "-D", "-i", "-f", str(self.conf))
        for node in NODES:
            self._daemon(_tool("slurmd"), "-D", "-N", node, "-f", str(self.conf))
        self._wait(self.nodes_idle, timeout, "the nodes did not come up idle")
        return self

    def nodes_idle(self) -> bool:
        proc = self.client("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: {proc.args[0]} exited with {proc.returncode}; logs in {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout} s; logs in {self.root}")
            time.sleep(0.1)

    def client(self, *command: str, check: bool = True, env: dict | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, Restarts, ExitCode, NodeList, ...)."""
        proc = self.client("scontrol", "-o", "show", "job", job_id)
        fields = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def stop(self) -> None:
        if self.conf.exists():
            self.client("scancel", "--user=root", check=False)  # this cluster only (SLURM_CONF)
        for proc in reversed(self.procs):  # nodes, then the controller, then munge
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munge, slurmctld and slurmd for nodes n1 and n2 on this machine, for the whole session. Without SLURM the
    tests that use it skip, naming the packages; with PIPELINE_REQUIRE_SLURM=1 (CI) that fails them instead."""
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("PIPELINE_REQUIRE_SLURM") == "1":
            pytest.fail(f"PIPELINE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def pytest_terminal_summary(terminalreporter):
    """One line for the cluster tests, so that a CI log shows they ran (not skipped) and how long they took."""
    reports = [r for reports in terminalreporter.stats.values() for r in reports
               if getattr(r, "nodeid", "").startswith("tests/test_slurm.py") and hasattr(r, "duration")]
    if reports:
        outcomes: dict[str, int] = {}
        for r in reports:
            if r.when == "call" or r.outcome != "passed":
                key = "xfailed" if hasattr(r, "wasxfail") else r.outcome
                outcomes[key] = outcomes.get(key, 0) + 1
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        terminalreporter.write_line(f"SLURM cluster tests (tests/test_slurm.py): {summary} in "
                                    f"{sum(r.duration for r in reports):.0f} s")
