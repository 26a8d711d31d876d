"""Run metrics: `metrics.jsonl` (plot it without wandb), the console, and wandb (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..config import WandbConfig
from ..fsutil import atomic_write_bytes
from ..layout import RunLayout
from ..redaction import redact, redact_values

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device) -> float | None:
    """The device's peak bf16 FLOP/s, or None where unknown (CPU): MFU is then reported as null."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") or cfg.api_key else "offline")


class MetricsLogger:
    """Appends one JSON object per record; mirrors train and eval records to wandb."""

    def __init__(self, run_dir: Path, stage: str, enabled: bool, wandb_cfg: WandbConfig, config: dict):
        self.stage, self.enabled = stage, enabled
        self.path = RunLayout(run_dir).metrics
        self._wandb = None
        if enabled and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a crash may have cut the last line short: end it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        if enabled and wandb_mode(wandb_cfg) != "disabled":
            import wandb

            # what wandb stores and shows is redacted; the key itself goes to wandb's settings only
            shown = redact({"name": wandb_cfg.name or f"{run_dir.name}-{stage}", "group": wandb_cfg.group,
                            "tags": list(wandb_cfg.tags), "config": config})
            settings = wandb.Settings(api_key=wandb_cfg.api_key) if wandb_cfg.api_key else None
            self._wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=shown["name"],
                                     group=shown["group"], tags=shown["tags"], config=shown["config"],
                                     dir=str(run_dir), mode=wandb_mode(wandb_cfg), job_type=stage, resume="allow",
                                     id=f"{run_dir.name}-{stage}".replace("/", "-")[:64], settings=settings)
            # Charts plot against our step, not wandb's own: a resumed run logs again the steps after its
            # checkpoint, which wandb would drop as lower than the last step it saw (HF's Trainer does the same)
            self._wandb.define_metric(f"{stage}/step")
            self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, record: dict, echo: bool = True, wandb: bool = True) -> None:
        """Append `record` (and show it on the console unless echo=False: a line said otherwise already);
        wandb=False keeps it out of wandb's charts (results reported once go to `table`)."""
        if not self.enabled:
            return
        record = redact_values({"stage": self.stage, **{k: _plain(v) for k, v in record.items()}})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            shown = " ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "stage" and v is not None)
            log.info("%s: %s", self.stage, shown)
        if self._wandb is not None and wandb:
            self._wandb.log({f"{self.stage}/{k}": v for k, v in record.items()
                             if k != "stage" and isinstance(v, (int, float))})

    def table(self, key: str, columns: list[str], rows: list[list], summary: dict) -> None:
        """Results reported once (the eval stage's): a wandb table under `key`, and `summary` in the run's
        summary, which wandb shows beside other runs' (metrics.jsonl has the records already)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)})
            self._wandb.summary.update(summary)

    def rewind(self, step: int) -> None:
        """After a resume from `step`: drop this stage's records past it (the run before the crash logged
        them; they are about to be logged again), so metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled or not self.path.is_file():
            return
        records = read_records(self.path)
        kept = [r for r in records if not (r.get("stage") == self.stage and _step(r) > step)]
        dropped = len(self.path.read_text(errors="replace").splitlines()) - len(kept)  # cut-short lines too
        if dropped:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            log.info("%s: dropped %d records past step %d from %s", self.stage, dropped, step, self.path)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def read_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order; a line cut short by a crash (or not a JSON
    object) is skipped. The one reader of the file: the report, model cards and rewind use it."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _step(record: dict) -> int:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


def _plain(value):
    if hasattr(value, "item") and callable(value.item):  # a tensor (or numpy scalar)
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; the skip counters say what happened
    return value


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
