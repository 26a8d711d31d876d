"""run_distributed_test(fn, world_size=2, backend="gloo"): `fn(*args)` on `world_size` fresh processes that
form one process group (as OLMo-core's helper of that name), for tests that need ranks but not the CLI.

Each rank gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE as a launcher sets them,
joins the gloo group, and runs `fn`, which must be picklable (a module-level function of a test module).
An exception on any rank fails the test with that rank's traceback; a rank that hangs fails it at `timeout`.

The ranks are forked from a forkserver that has imported torch and DeepSpeed once per session (it never
ran a torch op, so forking it is safe), which spares each rank the seconds those imports take."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

# what every rank would import anyway (torch._dynamo: the optimizers' first use imports it; matplotlib: rank 0's
# report); rank_preload: what each rank would do at start-up anyway
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "numpy", "sentencepiece", "deepspeed",
           "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
           "pipeline.runner", "pipeline.stages.pretrain", "pipeline.stages.finetune", "pipeline.train.engine", "pipeline.train.trainer",
           "pipeline.data.stream", "pipeline.data.mixture", "pipeline.checkpoint.store", "pipeline.checkpoint.elastic", "pipeline.observe.report",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "rank_preload"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, backend: str, port: int, init: bool, errors: str, fn, args: tuple,
               kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    # each rank its share of the cores, as the pipeline's own local launch arranges
    threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    record = Path(errors, f"rank{rank}")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(threads))
        if init:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        try:
            fn(*args, **kwargs)
        except BaseException:  # noted before the group goes down and the peers notice
            record.write_text(f"{time.time()}\n{traceback.format_exc()}")
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:
        if not record.exists():
            record.write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise


def _failures(errors: str) -> str:
    """Every failed rank's traceback, the first to fail first (the others mostly lost their peer)."""
    found = []
    for path in Path(errors).glob("rank*"):
        when, text = path.read_text().split("\n", 1)
        found.append((float(when), path.name.removeprefix("rank"), text))
    return "\n".join(f"-- rank {rank} failed{' first' if i == 0 and len(found) > 1 else ''}:\n{text}"
                     for i, (_, rank, text) in enumerate(sorted(found)))


@contextmanager
def _forkserver_sys_path():
    """This process's sys.path as PYTHONPATH while the forkserver may start: before Python 3.12 it ignores the
    sys.path it is handed, and the preloads of this checkout's pipeline modules (and rank_preload, here in
    tests/) would fail silently, leaving every rank to import them itself."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def run_distributed_test(fn, world_size: int = 2, backend: str = "gloo", *, args: tuple = (),
                         kwargs: dict | None = None, timeout: float = 300, init: bool = True,
                         start_method: str = "forkserver") -> None:
    """`init=False`: the environment only; `fn` joins the process group itself (as the pipeline's ranks do)."""
    import multiprocessing

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="ranks-") as errors:
        with _forkserver_sys_path():  # only while the ranks start (the forkserver starts with the first ones)
            context = mp.start_processes(_rank_main, args=(world_size, backend, free_port(), init, errors, fn, args,
                                                           kwargs or {}),
                                         nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
        except ProcessException as exc:
            grace = time.monotonic() + 10  # the peers of a failed rank fail too, soon: their story counts
            while any(p.is_alive() for p in context.processes) and time.monotonic() < grace:
                time.sleep(0.05)
            raise AssertionError(f"{fn.__name__} failed on {world_size} ranks:\n{_failures(errors) or exc}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
