"""The console during a run: the pipeline's own lines; everything else in a log file under run_dir.

The console keeps what a person follows a run by: stage lines, progress bars, step records, warnings
(each once, from rank 0) and errors (one `error:` line). The rest goes to `run_dir/logs/`, which the
console names once when the run starts: `pipeline.log` for the process the user started and
`rank<N>.log` for each rank (of our local ranks or of an external launcher):

- Descriptors 1 and 2 of every process that runs stages point at its log file, so what subprocesses
  and C/C++ code write (the `gcc ... test.c` lines of DeepSpeed's op builds, gloo, torch's C++
  warnings) lands there. `sys.stdout` stays on descriptor 1: what libraries print, and DeepSpeed's
  own logger, go to the file too. `sys.stderr` becomes a copy of the original descriptor 2 (progress
  bars, error lines), and the console handler of `logging` writes to a copy of the original 1.
- `logging`: records of the `pipeline.*` loggers at INFO and above reach the console, on rank 0 (or
  the process the user started) only, each warning once, warnings prefixed `warning: `; every record
  of every logger, every rank, reaches the log file. Loggers of libraries that bring their own handler
  on a standard stream (torch, DeepSpeed) are made to go through ours.
- Python warnings raised in the pipeline's own code are console warnings; raised anywhere else (torch,
  DeepSpeed, ...) they go to the log file only.
- `debug=true` leaves the descriptors alone and shows every record of every rank on the console.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..layout import RunLayout
from ..redaction import install_log_redaction, redact_text

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# Set for the local ranks we start: the process that started them has named the log already.
NAMED_ENV = "PIPELINE_CONSOLE_LOG_NAMED"
# Loggers that come with their own handler on a standard stream (and do not propagate).
LIBRARY_LOGGERS = ("torch", "torch.distributed", "DeepSpeed")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Console:
    path: Path  # this process's log file
    file: TextIO  # the log file, for logging's file handler
    log_fd: int | None  # a descriptor of the log file, while descriptors 1 and 2 point at it
    console_fds: tuple[int, int] | None  # copies of the original descriptors 1 and 2
    out: TextIO  # the console (original descriptor 1)


_console: _Console | None = None


def is_pipeline_record(record: logging.LogRecord) -> bool:
    return record.name == "pipeline" or record.name.startswith("pipeline.")


class ConsoleFilter(logging.Filter):
    """The pipeline's own records at INFO and above; a warning already shown is not shown again."""

    def __init__(self):
        super().__init__()
        self.shown: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_pipeline_record(record) or record.levelno < logging.INFO:
            return False
        if record.levelno >= logging.WARNING:
            key = (record.levelno, record.getMessage())
            if key in self.shown:
                return False
            self.shown.add(key)
        return True


class ConsoleFormatter(logging.Formatter):
    """The message as it is; a warning says it is one. (Errors are left as they are: the one `error:`
    line of a failed run is the entry point's.)"""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def setup(run_dir: Path, rank: int | None, debug: bool) -> Path | None:
    """Console and log file for this process; `rank` is None for the process the user started (not under
    a launcher), else the global rank. Returns the log file, or None where it cannot be opened (the
    console then stays as it was)."""
    global _console
    if _console is not None:
        return _console.path
    path = RunLayout.of(run_dir).log_file(rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    except OSError as exc:
        log.warning("no log file (%s: %s): everything stays on the console", exc.strerror, path)
        return None
    who = "the process the user started" if rank is None else f"rank {rank}"
    log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S %Z')} pid {os.getpid()} ({who}): "
                   f"{redact_text(' '.join([sys.executable, *sys.argv]))}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = console_fds = None
    out: TextIO = sys.stdout
    if not debug:
        console_fds = (os.dup(1), os.dup(2))  # not inheritable: the ranks we start get the console itself
        out = os.fdopen(os.dup(console_fds[0]), "w", buffering=1, encoding=sys.stdout.encoding,
                        errors="backslashreplace")
        sys.stderr = os.fdopen(os.dup(console_fds[1]), "w", buffering=1, encoding=sys.stderr.encoding,
                               errors="backslashreplace")
        log_fd = os.dup(log_file.fileno())
        _point_std_descriptors_at(log_fd)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's console handler, on what is now the log file
        root.removeHandler(handler)
    to_file = logging.StreamHandler(log_file)
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(to_file)
    if debug or rank in (None, 0):  # other ranks' lines are in their log files
        to_console = logging.StreamHandler(out)
        to_console.setFormatter(ConsoleFormatter("%(message)s"))
        if not debug:
            to_console.addFilter(ConsoleFilter())
        root.addHandler(to_console)
    root.setLevel(logging.INFO)
    warnings.showwarning = show_warning
    _console = _Console(path=path, file=log_file, log_fd=log_fd, console_fds=console_fds, out=out)
    if rank is not None:  # every rank needs torch; its logger's handler must not take our console
        import torch  # noqa: F401
    adopt_library_loggers()
    install_log_redaction()  # on our handlers too: no secret value in the console or the log file
    if not debug:
        os.environ.setdefault("WANDB_QUIET", "true")  # wandb's run summary tables: wandb's own files have them
    if rank in (None, 0) and not os.environ.get(NAMED_ENV):
        per_rank = path.parent / "rank<N>.log"
        where = f"{path}; each rank's in {per_rank}" if rank is None else f"{per_rank}, one per rank"
        log.info("log: %s (compiler output, library warnings, every rank's lines; debug=true shows them here)",
                 where)
    return path


def _point_std_descriptors_at(fd: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def adopt_library_loggers() -> None:
    """Loggers of imported libraries that write to a standard stream themselves: their records go through
    the root logger's handlers instead (the log file; the console only with debug=true), redacted."""
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    if _console is not None:
        streams.add(id(_console.out))
    for name in LIBRARY_LOGGERS:
        if name not in logging.Logger.manager.loggerDict:
            continue  # not imported (yet)
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and id(handler.stream) in streams:
                logger.removeHandler(handler)
        logger.propagate = True


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: a console warning when the pipeline's own code raised it, else a record for
    the log file."""
    if file is not None:  # asked for a particular stream
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    try:
        ours = Path(filename).resolve().is_relative_to(PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours:
        logging.getLogger("pipeline.warnings").warning("%s (%s: %s:%d)", message, category.__name__,
                                                       Path(filename).name, lineno)
    else:
        logging.getLogger("py.warnings").warning("%s", warnings.formatwarning(message, category, filename,
                                                                              lineno, line).rstrip())


@contextmanager
def console_for_local_ranks():
    """While this process runs local ranks: they inherit descriptors 1 and 2 and must get the console, not
    this process's log file (each rank points its own at its log file); they do not name the log again.
    What the launcher itself logs meanwhile (torch's elastic agent) goes to the log file."""
    adopt_library_loggers()
    os.environ[NAMED_ENV] = "1"
    redirected = _console is not None and _console.log_fd is not None
    if redirected:
        sys.stdout.flush()
        os.dup2(_console.console_fds[0], 1)
        os.dup2(_console.console_fds[1], 2)
    try:
        yield
    finally:
        os.environ.pop(NAMED_ENV, None)
        if redirected:
            _point_std_descriptors_at(_console.log_fd)


def to_log_only(line: str) -> None:
    """A line the console has already shown (the entry point's error line), for the log file too."""
    if _console is not None:
        try:
            _console.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")
        except (OSError, ValueError):  # closed, or the disk is full: the console had it
            pass
