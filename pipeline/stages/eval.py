"""`eval` stage: EleutherAI's lm-evaluation-harness (lm-eval) on each export, offline.

Tasks: `eval.tasks`, lm-eval task, group or tag names, found among lm-eval's own task files and the folders of
`eval.include_path`; with no eval.tasks on data=default, the built-in tasks of `eval_tasks.py` (written to
`eval/tasks/`). A task must read local data (json/jsonl, csv, parquet, arrow, text files or a local dataset
folder): one that would fetch from the Hugging Face Hub is refused with an `error:` line before any model
loads, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (set by the entry point) stop any download anyway.

Each export is loaded by transformers and scored by lm-eval's HF model class (`HFLM`) with
`prefix_token_id` = `</s>`: pretraining separates documents by `</s>` alone, so that is the token a
document follows, not lm-eval's default `<s>`, which the model never saw. Results: lm-eval's results JSON in
`eval/<source>/results.json`, one `metrics.jsonl` record per task and metric, a wandb table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import yaml

from ..config import EvalConfig
from ..data.eval_tasks import BUILTIN_TASKS, files_digest, task_files, write_builtin_tasks
from ..data.vocab import EOS_ID
from ..errors import PipelineError
from ..fsutil import atomic_write_bytes, sha256_file
from ..layout import TRAINING_STAGES, RunLayout
from ..observe.metrics import MetricsLogger
from .context import Context

log = logging.getLogger(__name__)

LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text")  # datasets' loaders of local files
HASHED_FILE = 64 << 20  # files up to this size are identified by sha256, larger ones by size and mtime
LOCAL_DATA_HINT = ("give it local data: a task YAML in a folder of eval.include_path with `dataset_path: json` "
                   "(or parquet, arrow) and `dataset_kwargs: {data_files: {test: /path/to/data.jsonl}}`")


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    ev, layout = ctx.cfg.eval, ctx.layout
    try:
        harness = version("lm_eval")
    except PackageNotFoundError as exc:
        raise PipelineError("the eval stage needs lm-evaluation-harness: pip install 'lm-eval[hf]' "
                            "(or leave eval out of stages=)") from exc
    builtin = files_digest(task_files(ctx.cfg.data.seed, layout.eval_tasks)) if uses_builtin(ctx) else None
    return {"eval": asdict(ev), "lm_eval": harness, "tasks": task_names(ctx),
            "exports": {s: folder_fingerprint(layout.export(s)) for s in sources(ev, layout, strict=False)},
            "task_files": {"builtin": builtin,
                           **{p: folder_fingerprint(Path(p).expanduser(), task_data=True) for p in ev.include_path}}}


def run(ctx: Context) -> list[Path]:
    ev, layout = ctx.cfg.eval, ctx.layout
    names = task_names(ctx)
    if not names:
        log.warning("eval: no eval.tasks given and data=files has no built-in tasks: nothing evaluated; name "
                    "lm-eval tasks with eval.tasks=[...] (your own with eval.include_path=[DIR])")
        return []
    evaluated = sources(ev, layout, strict=True)
    include = [str(Path(p).expanduser().resolve()) for p in ev.include_path]
    if uses_builtin(ctx):
        include.insert(0, str(write_builtin_tasks(ctx.cfg.data.seed, layout.eval_tasks)))
    manager = task_manager(names, include)
    refuse_hub_tasks(manager, names)  # before any model loads
    metrics = MetricsLogger(layout.run_dir, "eval", True, ctx.cfg.logging.wandb, ctx.resolved)
    files, rows = [], []
    try:
        for source in evaluated:
            log.info("eval: %s on %s (lm-eval)", ", ".join(names), layout.export(source))
            results = evaluate(layout.export(source), names, manager, ev)
            files.append(write_results(layout, source, results))
            for record in metric_records(results):
                metrics.log({"source": source, **record}, wandb=False)
                rows.append([source, record["task"], record["metric"], record["value"], record["stderr"]])
        metrics.table("eval/results", ["source", "task", "metric", "value", "stderr"], rows,
                      {f"eval/{s}/{t}/{m}": v for s, t, m, v, _ in rows})
    finally:
        metrics.finish()
    return files


# -- which tasks, which exports ----------------------------------------------------------------------------
def task_names(ctx: Context) -> list[str]:
    """eval.tasks, or on data=default with none given the built-in tasks."""
    if ctx.cfg.eval.tasks:
        return list(ctx.cfg.eval.tasks)
    return list(BUILTIN_TASKS) if ctx.cfg.data.source == "default" else []


def uses_builtin(ctx: Context) -> bool:
    return any(name in BUILTIN_TASKS for name in task_names(ctx))


def sources(ev: EvalConfig, layout: RunLayout, strict: bool) -> list[str]:
    """The exports to evaluate; `strict`: one asked for that does not exist is an error."""
    present = [s for s in TRAINING_STAGES if (layout.export(s) / "config.json").is_file()]
    wanted = list(TRAINING_STAGES) if ev.source == "all" else [ev.source]
    found = [s for s in wanted if s in present]
    if strict and (not found or (ev.source != "all" and ev.source not in present)):
        raise PipelineError(f"eval.source={ev.source}: no export under {layout.run_dir / 'export'} to evaluate; "
                            f"run stages=[export] first (export.source={ev.source})")
    return found


def folder_fingerprint(folder: Path, task_data: bool = False) -> list:
    """What a folder's files are (small ones by sha256, large ones by size and mtime); with `task_data`,
    also the local data files its lm-eval task YAMLs name outside it."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    if task_data:
        files += sorted({f for y in files if y.suffix in (".yaml", ".yml") for f in data_files(y)} - set(files))
    return [[str(p), p.stat().st_size, sha256_file(p) if p.stat().st_size <= HASHED_FILE else p.stat().st_mtime_ns]
            for p in files]


class _TaskYaml(yaml.SafeLoader):
    """lm-eval's YAML with its `!function` tags read as nothing: only the data's location is wanted here."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def data_files(task_yaml: Path) -> list[Path]:
    """The existing local files that a task YAML's dataset_kwargs.data_files names."""
    try:
        config = yaml.load(task_yaml.read_text(), Loader=_TaskYaml)
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(config, dict) or not isinstance(config.get("dataset_kwargs"), dict):
        return []
    named = _strings(config["dataset_kwargs"].get("data_files"))
    return [Path(f).expanduser().resolve() for f in named if "://" not in f and Path(f).expanduser().is_file()]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


# -- lm-eval -------------------------------------------------------------------------------------------
def task_manager(names: list[str], include: list[str]):
    """An lm-eval TaskManager that knows every task in `names`. Indexing lm-eval's own ~15,000 task files
    takes about 10 s, so when the include folders hold every task they are indexed alone."""
    from lm_eval.tasks import TaskManager

    if include:
        own = TaskManager(include_path=include, include_defaults=False)
        if all(name in own.all_tasks for name in names):
            return own
    manager = TaskManager(include_path=include or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise PipelineError(f"eval.tasks: {unknown} is not an lm-eval task, group or tag, nor a task in "
                            f"eval.include_path={include}; `lm-eval ls tasks` lists lm-eval's own, and a task of "
                            f"yours needs its YAML in a folder of eval.include_path")
    return manager


def leaf_configs(manager, name: str, depth: int = 0) -> list[tuple[str, dict]]:
    """(task, config) of every YAML task that `name` (a task, group or tag) runs; Python-defined tasks are
    left to lm-eval (their data is checked when they load)."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return []
    kind = entry.kind.name
    if kind == "TASK":
        return [(name, entry.cfg or {})]
    if kind == "TAG":
        return [leaf for other in manager.task_index.values() if name in other.tags
                for leaf in leaf_configs(manager, other.name, depth + 1)]
    if kind != "GROUP":
        return []
    found = []
    for member in (entry.cfg or {}).get("task", []):
        if isinstance(member, str):
            found += leaf_configs(manager, member, depth + 1)
        elif isinstance(member, dict) and isinstance(member.get("task"), str):
            base = dict(leaf_configs(manager, member["task"], depth + 1)).get(member["task"], {})
            found.append((member["task"], {**base, **member}))
    return found


def hub_dataset(config: dict) -> str | None:
    """Where a task's data would be downloaded from, or None when it is local."""
    path = config.get("dataset_path")
    if not isinstance(path, str):
        return None
    if path in LOCAL_BUILDERS:
        kwargs = config.get("dataset_kwargs") or {}
        remote = [f for f in _strings(kwargs.get("data_files")) if "://" in f]
        return remote[0] if remote else None
    return None if Path(path).expanduser().exists() else path


def refuse_hub_tasks(manager, names: list[str]) -> None:
    for name in names:
        for task, config in leaf_configs(manager, name):
            where = hub_dataset(config)
            if where:
                part = f" (part of {name})" if task != name else ""
                raise PipelineError(f"eval task {task!r}{part} reads its data from the Hugging Face Hub ({where!r}) "
                                    f"and the eval stage runs offline; {LOCAL_DATA_HINT}")


def evaluate(folder: Path, names: list[str], manager, ev: EvalConfig) -> dict:
    """lm-eval's simple_evaluate on the export in `folder`: its results dict (samples left out)."""
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = ev.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = ev.dtype or ("auto" if device.startswith("cuda") else "float32")  # bf16 matmuls are slow on CPU
    # transformers 5 (and 4.56+) takes dtype=, older 4.x torch_dtype=
    key = "torch_dtype" if tuple(map(int, transformers.__version__.split(".")[:2])) < (4, 56) else "dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, **{key: dtype if dtype == "auto" else getattr(torch, dtype)}).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    # A model object, not a path: HFLM then starts no accelerate process group (under torchrun the other
    # ranks wait for this one's completion record, they would never join)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size, prefix_token_id=EOS_ID,
              max_length=model.config.max_position_embeddings)
    try:
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=ev.limit,
                                  num_fewshot=ev.num_fewshot, log_samples=False)
    except Exception as exc:
        if _download_error(exc):
            raise PipelineError(f"eval.tasks={names}: a task's data could not be loaded offline "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"{LOCAL_DATA_HINT}") from exc
        raise
    return results


def _download_error(exc: BaseException) -> bool:
    """Whether an exception (or its cause) is datasets or the Hub refusing to go online."""
    while exc is not None:
        if isinstance(exc, ConnectionError) or type(exc).__module__.split(".")[0] in ("datasets", "huggingface_hub"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_results(layout: RunLayout, source: str, results: dict) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = layout.eval_results(source) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(results, indent=2, default=handle_non_serializable).encode())
    log.info("eval: %s results → %s", source, out)
    return out


def metric_records(results: dict) -> list[dict]:
    """One record per task and metric of lm-eval's results: `metric,filter` keys, with their `_stderr`."""
    records = []
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filtered = key.partition(",")
            if not filtered or metric.endswith("_stderr") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filtered}")
            records.append({"task": task, "metric": metric if filtered == "none" else key, "value": float(value),
                            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return records
