"""`export` stage: the newest complete checkpoint of a stage as an HF `LlamaForCausalLM` folder.

Weights: gathered one tensor at a time by the checkpoint reader (any ZeRO stage, any world size) and
streamed into safetensors by the HF adapter (`hf_llama.py`); tokenizer files by `hf_tokenizer.py`.
Crash safety: everything is written into `export/<source>.tmp-PID/`, which replaces `export/<source>/`
only once complete; a new export removes the leftovers of an interrupted one.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import yaml

from ..checkpoint.store import find_resumable
from ..cluster.control import pid_alive
from ..config import ExportConfig, ModelConfig
from ..data.vocab import BOS_ID, EOS_ID, IM_END, PAD_ID, load_tokenizer
from ..errors import PipelineError
from ..fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    disk_full,
    fsync_dir,
    replace_dir,
    sha256_file,
    space_message,
)
from ..hf.tokenizer import write_tokenizer
from ..layout import TRAINING_STAGES, RunLayout
from ..observe.metrics import read_records
from ..redaction import redact, redact_text
from .context import Context

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    found = {stage: find_resumable(ctx.layout.checkpoints(stage)) for stage in TRAINING_STAGES}
    tokenizer = ctx.layout.tokenizer
    return {"export": asdict(ctx.cfg.export), "tokenizer": sha256_file(tokenizer) if tokenizer.is_file() else "missing",
            "checkpoints": {stage: hit and {"tag": hit[0].name, "files": hit[1]["files"]}
                            for stage, hit in found.items()}}


def run(ctx: Context) -> list[Path]:
    return export_sources(ctx.cfg.export, ctx.cfg.model, ctx.layout)


def model_config_for(fallback: ModelConfig, record: dict, vocab_pieces: int) -> ModelConfig:
    """The ModelConfig recorded with the checkpoint, else `fallback` with the tokenizer's vocabulary."""
    saved = record.get("trainer_state", {}).get("model")
    if saved:
        known = {f.name for f in fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    else:
        model_cfg = replace(fallback, vocab_size=fallback.vocab_size or vocab_pieces)
    if model_cfg.vocab_size < vocab_pieces:
        raise PipelineError(f"model vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_pieces}")
    return model_cfg


# -- config files and model card ------------------------------------------------------------------------
def write_configs(model_cfg: ModelConfig, dtype_name: str, im_end_id: int, out: Path) -> None:
    from ..hf.llama import to_hf_config

    # transformers 5 reads "dtype", 4.x "torch_dtype"; 5.x ignores torch_dtype when dtype is set.
    atomic_write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, im_end_id],
                                                       "pad_token_id": PAD_ID})
    # Last: a folder without config.json does not load, should a kill leave a staging folder behind.
    atomic_write_json(out / "config.json", to_hf_config(model_cfg, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                                        pad_token_id=PAD_ID, dtype=dtype_name,
                                                        torch_dtype=dtype_name, use_cache=True))


def last_losses(layout: RunLayout, stage: str, step: int) -> dict[str, tuple[int, float] | None]:
    """The last train loss and val loss of `stage` logged at or before `step`."""
    found = {"loss": None, "val_loss": None}
    for record in read_records(layout.metrics):
        if record.get("stage") == stage and record.get("step", step + 1) <= step:
            for key in found:
                if record.get(key) is not None:
                    found[key] = (record["step"], record[key])
    return found


def model_card(layout: RunLayout, source: str, folder: Path, record: dict, model_cfg: ModelConfig,
               dtype_name: str) -> str:
    from ..train.model import num_params

    state = record.get("trainer_state", {})
    manifest = layout.manifest
    losses = last_losses(layout, source, record["step"])
    shown = {k: f"{v[1]:.4f} (step {v[0]})" if v else "not logged" for k, v in losses.items()}
    config_path = layout.config
    config = yaml.safe_dump(redact(yaml.safe_load(config_path.read_text())), sort_keys=False) \
        if config_path.is_file() else "(no config.yaml in the run directory)\n"
    rows = [("source stage", source), ("checkpoint", f"{folder.name} (step {record['step']})"),
            ("tokens seen", f"{state.get('tokens_seen', 0):,}"), ("final train loss", shown["loss"]),
            ("final val loss", shown["val_loss"]),
            ("shards manifest sha256", sha256_file(manifest) if manifest.is_file() else "missing"),
            ("model", f"{model_cfg.name}: {num_params(model_cfg, exclude_embedding=False) / 1e6:.1f}M parameters, "
                      f"vocab {model_cfg.vocab_size}, context {model_cfg.max_seq_len}"),
            ("weights dtype", dtype_name)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {layout.run_dir.name}: {source}

A Llama-architecture causal language model exported by the pipeline's `export` stage.

| | |
| --- | --- |
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
```

The fast tokenizer gives the SentencePiece ids of `tokenizer.model` (no dummy prefix, no BOS added;
training documents end with `</s>`). Chat turns use `<|im_start|>role\\n content<|im_end|>`
(`tokenizer.apply_chat_template`); generation stops at `</s>` or `<|im_end|>`.

## Resolved config

```yaml
{config}```
"""


# -- writing the folder ---------------------------------------------------------------------------------
def export_model(export: ExportConfig, fallback_model: ModelConfig, layout: RunLayout, source: str) -> Path:
    """Write export/<source>/ from the newest complete checkpoint of `source`; returns the folder.
    `fallback_model` is used only for a checkpoint whose record holds no model config."""
    from ..checkpoint.reader import checkpoint_tensors
    from ..hf.llama import DTYPES, write_weights

    if source not in TRAINING_STAGES:
        raise PipelineError(f"export source {source!r}: choose one of {list(TRAINING_STAGES)}")
    if export.dtype not in DTYPE_NAMES:
        raise PipelineError(f"export.dtype={export.dtype!r}: choose one of {list(DTYPE_NAMES)}")
    root = layout.checkpoints(source)
    found = find_resumable(root, digests=True)  # its files are unpickled below: contents must match the record
    if found is None:
        raise PipelineError(f"no complete {source} checkpoint under {root}: run stages=[{source}] first")
    folder, record = found
    sp = load_tokenizer(layout.tokenizer)
    model_cfg = model_config_for(fallback_model, record, sp.get_piece_size())
    target = layout.export(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f"{source}.tmp-*"):  # an interrupted export's, unless still running
        if not _written_by_live_process(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = target.with_name(f"{source}.tmp-{os.getpid()}")
    staging.mkdir()
    needed = None
    try:
        tensors = checkpoint_tensors(folder)
        needed = weights_bytes(tensors, DTYPES[export.dtype])
        write_weights(tensors, model_cfg, DTYPES[export.dtype], staging, max(1, int(export.max_shard_size_gb * 1e9)))
        write_tokenizer(layout.tokenizer, staging, model_cfg.max_seq_len)
        card = model_card(layout, source, folder, record, model_cfg, export.dtype)
        atomic_write_bytes(staging / "README.md", redact_text(card).encode())
        write_configs(model_cfg, export.dtype, sp.piece_to_id(IM_END), staging)
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException as exc:
        full = isinstance(exc, Exception) and disk_full(exc, staging, needed)  # before the cleanup frees space
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise PipelineError(f"export of {source}: {space_message(staging, needed)}; nothing was kept (an earlier {target} is unchanged): "
                                f"free space there or set run_dir on a larger disk, then rerun stages=[export]") from exc
        raise
    log.info("export: %s %s (step %d) → %s", source, folder.name, record["step"], target)
    return target


def weights_bytes(tensors: dict, dtype) -> int:
    """About what the safetensors files of `tensors` take in `dtype`."""
    import math

    import torch

    return sum(math.prod(t.shape) for t in tensors.values()) * torch.empty((), dtype=dtype).element_size()


def _written_by_live_process(staging: Path) -> bool:
    """A staging folder `<source>.tmp-<pid>` whose writer still runs on this host."""
    pid = staging.name.rsplit("-", 1)[-1]
    return pid.isdigit() and pid_alive(int(pid))


def export_sources(export: ExportConfig, fallback_model: ModelConfig, layout: RunLayout) -> list[Path]:
    """Export export.source ("all": each training stage with a complete checkpoint); the files written."""
    source = export.source
    if source == "all":
        sources = [s for s in TRAINING_STAGES if find_resumable(layout.checkpoints(s)) is not None]
        if not sources:
            raise PipelineError(f"no complete pretrain or finetune checkpoint under {layout.run_dir}: "
                                f"run stages=[pretrain] first")
    elif source in TRAINING_STAGES:
        sources = [source]
    else:
        raise PipelineError(f"export.source={source!r}: choose pretrain, finetune or all")
    files = []
    for name in sources:
        folder = export_model(export, fallback_model, layout, name)
        files += sorted(p for p in folder.iterdir() if p.is_file())
    return files
