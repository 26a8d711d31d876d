"""What every bench script shares: the hardware line, rows of bench/RESULTS.md, peak memory.

Imported as `bench.common`: each script puts the checkout root (not bench/) first on sys.path, because
bench/tokenize.py would otherwise shadow the standard library's `tokenize`.
"""
from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_RESULTS: another file for the rows (bench/gpu_suite.sh puts them in its output folder as they come).
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "RESULTS.md")
HEADER = ("# Benchmark results\n\nRows are appended by the bench scripts (`bench/*.py`): "
          "date, hardware, the exact command, and its figures.\n\n"
          "| date | hardware | command | figures |\n| --- | --- | --- | --- |\n")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of the visible GPUs: through torch when the script already imported it (it sees
    CUDA_VISIBLE_DEVICES), else nvidia-smi, so that scripts without torch pay no import for this."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return []
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def hardware() -> str:
    """OS, CPU, cores, RAM and, when there are any, the GPUs (with the torch version, which decides the kernels)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    line = f"{platform.system()} {platform.release()}, {cpu_name()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM"
    gpus = gpu_names()
    if gpus:
        counts = {name: gpus.count(name) for name in dict.fromkeys(gpus)}
        line += ", " + ", ".join(f"{n}× {name}" if n > 1 else name for name, n in counts.items())
        if "torch" in sys.modules:
            line += f", torch {sys.modules['torch'].__version__}"
    return line


def quiet_logs() -> None:
    """Warnings and errors only: DeepSpeed logs every engine build and save at INFO."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)


def figures(row: dict | str) -> str:
    return row if isinstance(row, str) else "; ".join(f"{k} {v}" for k, v in row.items())


def record(command: str, rows: dict | str | list, hw: str | None = None) -> None:
    """Append one dated row per entry of `rows` (a dict of figures, or a ready string) to bench/RESULTS.md,
    creating the file with its header first if needed. All rows of one call share the date."""
    rows = rows if isinstance(rows, list) else [rows]
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hw = hw or hardware()
    with open(RESULTS, "a") as f:
        for row in rows:
            f.write(f"| {date} | {hw} | `{command}` | {figures(row)} |\n")
    print(f"appended to {RESULTS}" if len(rows) == 1 else f"appended {len(rows)} rows to {RESULTS}")


def print_table(rows: list[dict]) -> None:
    """Right-aligned columns, one header line (the keys of the first row)."""
    widths = {k: max(len(k), *(len(row[k]) for row in rows)) for k in rows[0]}
    print("  ".join(k.rjust(widths[k]) for k in rows[0]))
    for row in rows:
        print("  ".join(v.rjust(widths[k]) for k, v in row.items()))


# -- memory ------------------------------------------------------------------------------------------------
def peak_rss_mib(children: bool = False) -> float:
    """ru_maxrss (KiB on Linux) of this process, or with children=True the largest of its waited-for
    descendants (one process's peak, not their sum: see MemorySampler for a process tree)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def _status_kib(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)
    except (OSError, ValueError):
        return 0  # it exited between the listing and the read


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class MemorySampler:
    """Samples `key` of /proc/PID/status (VmRSS: resident; RssAnon: resident minus file-backed pages such as
    a mmapped checkpoint) in a thread; with tree=True summed over PID and its descendants at each sample,
    which ru_maxrss cannot do. .peak (and stop()) in MiB. A peak shorter than `interval` can be missed."""

    def __init__(self, key: str = "VmRSS", pid: int | None = None, tree: bool = False, interval: float = 0.005):
        self.key, self.pid, self.tree = key, pid or os.getpid(), tree
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def sample(self) -> float:
        pids = [self.pid] + (_descendants(self.pid) if self.tree else [])
        mib = sum(_status_kib(pid, self.key) for pid in pids) / 1024
        self.peak = max(self.peak, mib)
        return mib

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak

    def __enter__(self) -> "MemorySampler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
