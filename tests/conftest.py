"""Shared helpers and fixtures.

- `run_cli`: `python -m pipeline OVERRIDES...` in a subprocess, as a user runs it: where the CLI, the process
  or its launch is what a test checks. The same command line without a process of its own:
  `run_config_checks` (the entry point's checks only: the config-error matrix), `run_in_process` (stages that
  need no ranks), `run_on_ranks` (distributed stages on ranks forked by tests/distributed.py).
- `TINY`: the one set of tiny training overrides every training test starts from.
- Session fixtures, shared by every module: small corpora with their tokenizer and shards, and trained runs,
  each made once per test run, also across pytest-xdist workers (`made_once`). Never write into one: copy it
  first (`fresh_run`, shutil.copytree).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the in-process runs use this checkout's pipeline, as `python -m pipeline` here does
    sys.path.insert(0, str(ROOT))
# as `python -m pipeline` sets them before anything imports transformers or datasets: nothing downloads
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ADVERSARIAL = [
    "def f(x):\n\tif x:\n        return  x\n\n",
    "    indented\n\t\ttabs\t\n\n\n  trailing   \n",
    "  leading and trailing spaces  ",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🙂🚀👩‍💻 and flags 🇫🇷",
    "mixed\r\nline endings\rand\x0bvertical\x0ctabs",
    "numbers 1234567890 3.14159 -42",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<s></s><pad><unk> look like specials but are text",
    "",
    " ",
    "\n",
    "a" * 3000,
    "Zalgo: Z̴̡̪͚a̷l̸g̵o̶",
]


def run_cli(*overrides: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline OVERRIDES...` as a user runs it."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@dataclass
class Checked:
    """What `run_config_checks` saw, under the names subprocess.CompletedProcess gives them."""
    returncode: int
    stdout: str
    stderr: str


class WouldStartWork(BaseException):
    """Raised where a run would create its run_dir: every check of the command line passed. A BaseException,
    so that the entry point's error handling cannot turn it into an `error:` line."""


def _entry_point(overrides: tuple[str, ...], patches: dict[str, Callable], log_to_stdout: bool = False) -> Checked:
    """`python -m pipeline OVERRIDES...` in this process, with the pipeline functions named in `patches`
    ("module.function") replaced: the config composed from conf/ as Hydra's main composes it (under the entry
    point's error handling, as `main` runs it), then the entry point's task function itself through Hydra's
    passthrough (unknown keys, the typed config, the runner). Output is captured (`log_to_stdout`: the log too,
    as the CLI prints it); signal handlers, log handlers and filters and Hydra's state are restored."""
    import importlib
    import logging

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import pipeline.__main__ as entry

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)}
    root = logging.getLogger()
    level, loggers = root.level, [*root.handlers, logging.getLogger("DeepSpeed")]
    filters = [list(target.filters) for target in loggers]
    originals = {}
    # in this process the console stays as pytest set it up (the CLI points descriptors 1 and 2 at run_dir/logs)
    patches = {"observe.console.setup": lambda *args, **kwargs: None, **patches}
    for name, replacement in patches.items():
        module, attr = name.rsplit(".", 1)
        module = importlib.import_module(f"pipeline.{module}")
        originals[module, attr] = getattr(module, attr)
        setattr(module, attr, replacement)
    out, err, code = io.StringIO(), io.StringIO(), 0
    console = logging.StreamHandler(out)  # Hydra's job logging for the CLI: the message alone, from INFO
    console.setFormatter(logging.Formatter("%(message)s"))
    if log_to_stdout:
        root.addHandler(console)
        root.setLevel(logging.INFO)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            with entry.errors_reported(debug=False):  # composition errors, as in `main`
                with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3", job_name="pipeline"):
                    cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # what Hydra's run_job does before the task function
                with open_dict(cfg):
                    del cfg["hydra"]
                entry._run(cfg)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for (module, attr), original in originals.items():
            setattr(module, attr, original)
        HydraConfig.instance().cfg = None
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root.removeHandler(console)
        root.setLevel(level)
        for target, kept in zip(loggers, filters):
            target.filters[:] = kept
    return Checked(code, out.getvalue(), err.getvalue())


def run_config_checks(*overrides: str) -> Checked:
    """`python -m pipeline OVERRIDES...` up to the point where the run would start work, in this process
    (see _entry_point). Creating run_dir raises WouldStartWork, so a check that is missed fails the test
    instead of running the pipeline here."""
    def would_start(cfg):
        raise WouldStartWork(f"every check passed: `python -m pipeline {' '.join(overrides)}` would start work")

    return _entry_point(overrides, {"runner.prepare_run_dir": would_start})


def run_in_process(*overrides: str) -> Checked:
    """`python -m pipeline OVERRIDES...` for stages that need no ranks (tokenize, shard, export), run in this
    process as the CLI runs them (see _entry_point): for tests of what the stages do, not of the process.
    Starting local ranks raises WouldStartWork: such a command belongs to run_cli or run_on_ranks."""
    def needs_ranks(*args):
        raise WouldStartWork(f"`python -m pipeline {' '.join(overrides)}` starts local ranks: not in-process")

    return _entry_point(overrides, {"cluster.local_launch.run_local_ranks": needs_ranks}, log_to_stdout=True)


def entry_point_arguments(*overrides: str) -> tuple:
    """(config, resolved, overrides): what `python -m pipeline OVERRIDES...` hands to run_pipeline."""
    seen = []
    proc = _entry_point(overrides, {"runner.run_pipeline": lambda *args: seen.append(args)})
    assert proc.returncode == 0 and len(seen) == 1, proc.stderr[-3000:]
    return seen[0]


def run_stages(config, resolved: dict, overrides: list[str], env: dict, logs: str) -> None:
    """One rank of run_on_ranks: the runner, as under torchrun, in the environment run_cli gives; what the
    rank logs goes to `logs`/rank<N>.log as the CLI prints it (Hydra's job logging: the message, from INFO)."""
    import logging

    os.environ.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    handler = logging.FileHandler(Path(logs) / f"rank{os.environ['RANK']}.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    from pipeline.runner import run_pipeline

    run_pipeline(config, resolved, overrides)


def run_on_ranks(*overrides: str, world_size: int = 2, env: dict | None = None, timeout: float = 600) -> str:
    """`python -m pipeline OVERRIDES...` for distributed stages, on `world_size` ranks that run_distributed_test
    forks (as a launcher such as torchrun would start them, without the seconds each fresh process spends
    importing torch and DeepSpeed): for runs whose launch is not what a test checks. Returns what the ranks
    logged (rank 0's lines first); a rank's exception fails the test with its traceback."""
    from distributed import run_distributed_test

    with tempfile.TemporaryDirectory(prefix="rank-logs-") as logs:
        run_distributed_test(run_stages, world_size, args=(*entry_point_arguments(*overrides), env or {}, logs),
                             init=False, timeout=timeout)
        return "".join(path.read_text() for path in sorted(Path(logs).glob("rank*.log")))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def mixed_documents(n: int, seed: int = 0) -> list[str]:
    """Prose, code, CJK, emoji and numbers: enough variety for a small tokenizer to train on."""
    rng = random.Random(seed)
    words = "the a river town baker walked to market with bread and honey under grey sky".split()
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + ".")
        elif kind == 1:
            docs.append(f"def item_{i}(x):\n    if x > {rng.randint(0, 999)}:\n\treturn x * {i}\n    return None\n")
        elif kind == 2:
            docs.append(rng.choice(ADVERSARIAL[:8]) + " " + " ".join(rng.choice(words) for _ in range(30)))
        else:
            docs.append(f"Row {i}\t{rng.randint(1000, 9999)}\t{rng.random():.4f}\n" * rng.randint(1, 8))
    return docs


def shared_root(tmp_path_factory) -> Path:
    """Where made_once keeps its folders: below the base temp that every pytest-xdist worker of a run shares."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    root.mkdir(exist_ok=True)
    return root


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `make(folder)` once per test run. Under pytest-xdist each worker is a session
    of its own: the first worker to ask makes it under a file lock while the others wait, then all of them read
    the same folder (below the run's shared base temp)."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    folder = made_once(tmp_path_factory, "corpus", lambda folder: write_jsonl(
        folder / "docs.jsonl", [{"text": d} for d in mixed_documents(400)]))
    return folder / "docs.jsonl"


SMALL_RUN = ("data=files", "tokenizer.vocab_size=600", "data.val_fraction=0.1", "stages=[tokenize,shard]")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_corpus) -> Path:
    """A run directory with a trained tokenizer and shards of `small_corpus`."""
    def make(run_dir: Path) -> None:
        proc = run_in_process(f"run_dir={run_dir}", f"data.paths=[{small_corpus}]", *SMALL_RUN)
        assert proc.returncode == 0, proc.stderr

    return made_once(tmp_path_factory, "run", make)


@pytest.fixture(scope="session")
def data_run(tmp_path_factory) -> Path:
    """Tokenizer and shards of a small built-in corpus (copy it before writing into it)."""
    def make(run_dir: Path) -> None:
        proc = run_in_process(f"run_dir={run_dir}", "stages=[tokenize,shard]", "data.default_num_documents=2000",
                              "tokenizer.vocab_size=1024", "data.val_fraction=0.05")
        assert proc.returncode == 0, proc.stderr

    return made_once(tmp_path_factory, "data", make)


# -- one tiny training setup --------------------------------------------------------------------------

TINY = ("model=tiny", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.log_interval=1", "train.warmup_steps=5", "train.lr=3e-3", "train.eval_batches=2")


def fresh_run(data: Path, target: Path) -> Path:
    """A run directory holding a copy of `data`'s tokenizer and shards, nothing else."""
    for name in ("tokenizer", "shards"):
        shutil.copytree(data / name, target / name)
    return target


def pretrain_cli(run_dir: Path, *overrides: str, check: bool = True, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline stages=[pretrain]` on `run_dir` with TINY, then `overrides`."""
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *overrides, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run_dir: Path, key: str = "loss", stage: str = "pretrain") -> dict[int, float]:
    """step -> value of the last record holding `key` for that step (a resumed run rewrites steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == stage and record.get(key) is not None:
            out[record["step"]] = record[key]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the launcher starts ranks in their own sessions)."""
    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def split_documents(run_dir: Path, source: str = "corpus") -> dict[str, list[list[int]]]:
    """Every document of each split of one source, in shard order, through the independent reader."""
    from mmidx_reference import independent_read

    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    docs = {}
    body = manifest["sources"][source]
    for split, split_body in body["splits"].items():
        docs[split] = []
        for shard in split_body["shards"]:
            dtype, seqs = independent_read(run_dir / "shards" / body.get("folder", source) / split / shard["prefix"])
            assert dtype == np.dtype(manifest["dtype"])
            docs[split] += seqs
    return docs


# -- trained runs, each made once per session ---------------------------------------------------------

ZERO_STEPS = 30  # zero_run: enough steps for the loss to fall; its one checkpoint is the last step's
ZERO_RUN = (f"train.max_steps={ZERO_STEPS}", f"train.eval_interval={ZERO_STEPS}", "launch.nproc_per_node=2")


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory, data_run) -> Callable[[str, str], Path]:
    """zero_run(zero, precision): data_run's data pretrained ZERO_STEPS steps with TINY on 2 CPU ranks
    (run_on_ranks), validated at the last step, its checkpoint the only one; made once. test_pretrain checks
    the training, test_export exports it. Read it, or copy it."""
    runs: dict[tuple[str, str], Path] = {}

    def make(zero: str, precision: str, run_dir: Path) -> None:
        run_on_ranks(f"run_dir={fresh_run(data_run, run_dir)}", "stages=[pretrain]", *TINY, f"deepspeed={zero}",
                     f"precision={precision}", *ZERO_RUN)

    def get(zero: str, precision: str) -> Path:
        if (zero, precision) not in runs:
            runs[zero, precision] = made_once(tmp_path_factory, f"{zero}-{precision}",
                                              lambda run_dir: make(zero, precision, run_dir))
        return runs[zero, precision]

    return get


# Resumed runs: fp32 (bit-exact), dropout on (the RNG state must be restored), a checkpoint each step.
RESUME = ("precision=fp32", "train.max_steps=12", "train.save_interval=1", "train.keep_last=2",
          "train.eval_interval=100", "launch.nproc_per_node=2", "model.dropout=0.1")
# Their reference keeps every checkpoint (resume tests start from them) and writes them without the writer
# thread; neither changes a loss.
REFERENCE = (*RESUME, "train.keep_last=12", "train.async_checkpoint=false")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, data_run):
    """uninterrupted(zero) -> Future of a run dir: TINY + REFERENCE with deepspeed=zero on 2 ranks
    (run_on_ranks), never interrupted: what every resumed run must equal to the bit. Started in the
    background on first ask (one at a time), so that the launches of a test can overlap it."""
    from distributed import run_distributed_test

    pool = ThreadPoolExecutor(max_workers=1)
    futures: dict[str, Future] = {}

    def make(run_dir: Path, arguments: tuple) -> None:
        fresh_run(data_run, run_dir)
        with tempfile.TemporaryDirectory(prefix="rank-logs-") as logs:
            run_distributed_test(run_stages, 2, args=(*arguments, {}, logs), init=False, timeout=600)

    def get(zero: str) -> Future:
        if zero not in futures:
            name = f"uninterrupted-{zero}"
            run_dir = shared_root(tmp_path_factory) / name
            arguments = entry_point_arguments(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, f"deepspeed={zero}",
                                              *REFERENCE)  # here: it installs signal handlers (main thread)
            futures[zero] = pool.submit(made_once, tmp_path_factory, name, lambda folder: make(folder, arguments))
        return futures[zero]

    yield get
    pool.shutdown(wait=True)


def checkpoint_copy(run_dir: Path, target: Path, step: int) -> Path:
    """A copy of `run_dir` as a run killed right after its checkpoint of `step` leaves it: the later
    checkpoints and the stage's completion record gone, `latest` at `step`."""
    shutil.copytree(run_dir, target)
    root = target / "pretrain" / "checkpoints"
    for folder in root.glob("step_*"):
        if int(folder.name.removeprefix("step_")) > step:
            shutil.rmtree(folder)
    assert (root / f"step_{step:08d}").is_dir()
    if (root / "latest").is_file():
        (root / "latest").write_text(f"step_{step:08d}")
    (target / "stages" / "pretrain.json").unlink()
    return target


# a few fp32 steps with an eval at the end: the curves of different launchers and rank counts must agree
STEPS = ("deepspeed=zero2", "precision=fp32", "train.max_steps=8", "train.eval_interval=8", "train.save_interval=8")


@pytest.fixture(scope="session")
def two_local_ranks(tmp_path_factory, small_run) -> Path:
    """small_run's data, TINY + STEPS on 2 local ranks started by the pipeline itself (not under a launcher):
    the reference of the launcher tests and of 1 rank with gradient accumulation."""
    def make(run_dir: Path) -> None:
        proc = pretrain_cli(fresh_run(small_run, run_dir), *STEPS, "launch.nproc_per_node=2")
        assert "2 ranks ×" in proc.stdout and f"report in {run_dir / 'report' / 'report.md'}" in proc.stdout
        assert proc.stdout.count("run finished:") == 1  # the local ranks leave the report to this process
        assert "final val loss" in (run_dir / "report" / "report.md").read_text()

    return made_once(tmp_path_factory, "two_local_ranks", make)


BUILTIN = ("model=tiny", "launch.nproc_per_node=2")  # the built-in run: otherwise the default config
BUILTIN_STEPS = 300


@pytest.fixture(scope="session")
def builtin_pretrained(tmp_path_factory) -> Path:
    """The built-in world (default corpus and config, model=tiny, 2 ranks) through tokenize, shard and
    BUILTIN_STEPS pretraining steps (run_in_process, run_on_ranks), validated every 50: long enough for the tiny model to hold some of its
    facts (test_finetune) and to learn the corpus well below its unigram entropy (test_pretrain)."""
    def make(run_dir: Path) -> None:
        command = (f"run_dir={run_dir}", *BUILTIN, f"train.max_steps={BUILTIN_STEPS}", "train.eval_interval=50",
                   f"train.save_interval={BUILTIN_STEPS}", "train.log_interval=50")
        # as the CLI runs stages=[tokenize,shard,pretrain]: the data stages in its own process, then the ranks
        proc = run_in_process(*command, "stages=[tokenize,shard]")
        assert proc.returncode == 0, proc.stderr[-4000:]
        run_on_ranks(*command, "stages=[pretrain]")

    return made_once(tmp_path_factory, "builtin", make)


# -- checkpoints and background launches, for the fault and optimizer tests ---------------------------------
def checkpoints(run_dir: Path) -> Path:
    return run_dir / "pretrain" / "checkpoints"


class Launch:
    """One `python -m pipeline` run in the background; output in files (a full pipe would stall it)."""

    def __init__(self, run_dir: Path, args: tuple[str, ...], env: dict | None, name: str):
        self.out, self.err = run_dir / f"{name}.out", run_dir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", f"run_dir={run_dir}", "stages=[pretrain]",
                                          *TINY, *args], cwd=ROOT, stdout=out, stderr=err,
                                         env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})

    def finish(self, kill_when: Callable[[], bool] | None = None, timeout: float = 180) -> int:
        """Wait for the run to end; SIGKILL its whole process tree as soon as `kill_when()` holds."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if kill_when is not None and kill_when():
                kill_tree(self.proc.pid)
                break
            assert time.monotonic() < deadline, f"no end within {timeout} s: {self.err.read_text()[-2000:]}"
            time.sleep(0.005)
        return self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out.read_text()


def tensors(path: Path) -> list:
    """Every tensor in a DeepSpeed checkpoint file (our own files: trusted pickles), in a fixed order."""
    import torch

    found: list = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                walk(node[key])
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
    walk(torch.load(path, map_location="cpu", weights_only=False))
    return found


def same_state(run_dir: Path, a: int, b: int, pattern: str) -> bool:
    """Weights and optimizer state (Adam's moments and step count) of checkpoints a and b, bit for bit,
    in every file matching `pattern` (one per rank for ZeRO's partitions)."""
    import torch

    from pipeline.checkpoint.store import tag_for

    files = sorted((checkpoints(run_dir) / tag_for(a)).glob(pattern))
    assert files
    for file in files:
        left, right = tensors(file), tensors(checkpoints(run_dir) / tag_for(b) / file.name)
        if len(left) != len(right) or not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(left, right)):
            return False
    return True


def skip_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "skipped_update" in r}



# a real two-node SLURM: the session fixture `slurm_cluster`, and CI's line on the cluster tests
from slurm_cluster import pytest_terminal_summary, slurm_cluster  # noqa: E402,F401
