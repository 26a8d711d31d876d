"""Fast checks of the engine's pure parts: schedule, DeepSpeed JSON, param groups, checkpoint records."""
import json

import pytest

from pipeline.checkpoint.store import RECORD, find_resumable, prune, verify
from pipeline.config import DeepSpeedConfig, ModelConfig, PrecisionConfig, TrainConfig
from pipeline.data.batching import BatchLayout
from pipeline.errors import PipelineError
from pipeline.train.engine import deepspeed_config, param_groups
from pipeline.train.model import Transformer
from pipeline.train.schedule import lr_at


def test_schedules():
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(0.1) and lr_at(9, cosine) == pytest.approx(1.0)
    assert lr_at(60, cosine) == pytest.approx(0.55) and lr_at(109, cosine) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(500, cosine) == pytest.approx(0.1)
    constant = TrainConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_at(s, constant) for s in (0, 50, 1000)} == {1.0}
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0
    with pytest.raises(PipelineError, match="schedule"):
        lr_at(20, TrainConfig(schedule="linear", warmup_steps=0))


def test_deepspeed_json_follows_the_groups():
    train = TrainConfig(grad_clip=0.5)
    zero3 = deepspeed_config(train, DeepSpeedConfig(stage=3, offload_optimizer=True, offload_param=True,
                                                    extra={"zero_optimization": {"stage3_max_live_parameters": 7}}),
                             PrecisionConfig(name="bf16"), micro_batch=4, grad_accum=2)
    assert zero3["train_micro_batch_size_per_gpu"] == 4 and zero3["gradient_accumulation_steps"] == 2
    assert zero3["gradient_clipping"] == 0.5 and zero3["bf16"] == {"enabled": True}
    assert zero3["data_types"] == {"grad_accum_dtype": "fp32"}
    zero = zero3["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["stage3_max_live_parameters"] == 7
    fp32 = deepspeed_config(train, DeepSpeedConfig(stage=1), PrecisionConfig(name="fp32"), 1, 1)
    assert "bf16" not in fp32 and "fp16" not in fp32
    with pytest.raises(PipelineError, match="zero3_offload"):
        deepspeed_config(train, DeepSpeedConfig(stage=2, offload_param=True), PrecisionConfig(), 1, 1)
    with pytest.raises(PipelineError, match="precision"):
        deepspeed_config(train, DeepSpeedConfig(), PrecisionConfig(name="fp8"), 1, 1)


def test_global_batch_must_divide():
    assert BatchLayout.of(TrainConfig(micro_batch_size=2, global_batch_size=16), "train", 2).accumulation == 4
    with pytest.raises(PipelineError, match="not a multiple"):
        BatchLayout.of(TrainConfig(micro_batch_size=2, global_batch_size=6), "train", 2)


def test_no_weight_decay_on_norms_and_embeddings():
    model = Transformer(ModelConfig(vocab_size=300))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("norm.weight", "tok_embeddings.weight")) for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def fake_checkpoint(root, step, complete=True, files=None):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    files = files or {"model.pt": b"weights", "rng_rank00000.pt": b"rng"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if complete:
        (folder / RECORD).write_text(json.dumps({"step": step, "world_size": 1, "trainer_state": {},
                                                 "files": {n: len(d) for n, d in files.items()}}))
    return folder


def test_resume_picks_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    fake_checkpoint(tmp_path, 10)
    truncated = fake_checkpoint(tmp_path, 20)
    (truncated / "model.pt").write_bytes(b"w")
    fake_checkpoint(tmp_path, 30, complete=False)
    folder, record = find_resumable(tmp_path)
    assert record["step"] == 10
    assert "step_00000030 skipped: no completion record" in caplog.text
    assert "model.pt has 1 bytes" in caplog.text
    assert verify(truncated)[0] is None


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]
    prune(tmp_path, keep_last=0)  # never below one good checkpoint
    assert (tmp_path / "step_00000003").exists()


def test_metrics_rewind_drops_the_stage_records_past_the_resumed_step(tmp_path):
    """A run killed after its step-6 checkpoint had logged steps 7 and 8 and half a line; on resume those go,
    other stages' records stay, and the next record starts on its own line."""
    from pipeline.config import WandbConfig
    from pipeline.observe.metrics import MetricsLogger

    lines = [{"stage": "pretrain", "step": 6, "loss": 1.0}, {"stage": "finetune", "step": 9, "loss": 2.0},
             {"stage": "pretrain", "step": 7, "loss": 0.9}, {"stage": "pretrain", "step": 8, "val_loss": 0.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "pretrain", "st')
    metrics = MetricsLogger(tmp_path, "pretrain", True, WandbConfig(mode="disabled"), {})
    metrics.rewind(6)
    metrics.log({"step": 7, "loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [*lines[:2], {"stage": "pretrain",
                                                                                       "step": 7, "loss": 0.5}]
    MetricsLogger(tmp_path, "pretrain", False, WandbConfig(mode="disabled"), {}).rewind(0)  # other ranks: no-op
    assert len(path.read_text().splitlines()) == 3


class MonotonicWandbRun:
    """wandb's rule for a resumed run: a log(step=N) below the last step seen is dropped."""

    def __init__(self, last_step: int):
        self.last_step, self.kept, self.metrics = last_step, [], {}

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data, step=None):
        if step is not None and step < self.last_step:
            return  # wandb warns and drops it
        self.last_step = step if step is not None else self.last_step + 1
        self.kept.append(data)


def test_wandb_keeps_the_steps_a_resumed_run_logs_again(tmp_path, monkeypatch):
    """The run before the crash logged up to step 8 and resumes from step 6: steps 7 and 8 come again and
    must reach wandb, charted against the stage's own step."""
    import wandb

    from pipeline.config import WandbConfig
    from pipeline.observe.metrics import MetricsLogger

    run = MonotonicWandbRun(last_step=8)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    metrics = MetricsLogger(tmp_path, "pretrain", True, WandbConfig(mode="offline"), {})
    for step in (7, 8, 9):
        metrics.log({"step": step, "loss": 1.0 / step})
    assert [r["pretrain/step"] for r in run.kept] == [7, 8, 9] and run.kept[0]["pretrain/loss"] == 1 / 7
    assert run.metrics == {"pretrain/step": None, "pretrain/*": "pretrain/step"}
