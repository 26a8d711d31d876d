"""The optimizer group: AdamW (the default) and DeepSpeed's Muon. Fast checks of the config, the parameter
split and the DeepSpeed JSON; then Muon for real on 2 CPU ranks (ZeRO 0-3, resume after a kill, skipped
updates, export)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import error_lines, run_config_checks

from pipeline.checkpoint.store import tag_for
from pipeline.config import (
    DeepSpeedConfig,
    ModelConfig,
    OptimizerConfig,
    PrecisionConfig,
    TrainConfig,
    optimizer_inputs,
)
from pipeline.errors import PipelineError
from pipeline.train.engine import build_muon, build_optimizer, deepspeed_config, muon_split
from pipeline.train.model import Transformer
from pipeline.validate import validate_optimizer

MUON = OptimizerConfig(name="muon")
HIDDEN = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=300, **overrides))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny()
    muon, adamw = muon_split(model, MUON)
    assert {n.rsplit(".", 2)[-2] for n in muon} == HIDDEN and len(muon) == 7 * model.cfg.n_layers
    assert all(n.startswith("layers.") for n in muon)
    assert set(adamw) == {"tok_embeddings.weight", "output.weight", "norm.weight"} | {
        f"layers.{i}.{norm}.weight" for i in range(model.cfg.n_layers) for norm in ("attention_norm", "ffn_norm")}
    optimizer = build_muon(model, TrainConfig(lr=2e-3, weight_decay=0.1), OptimizerConfig(name="muon", muon_lr_ratio=5),
                           torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["use_muon"], g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in optimizer.param_groups]
    assert groups[0][:3] == (True, pytest.approx(1e-2), 0.1) and groups[0][3] == set(muon)
    # the AdamW half is what optimizer=adamw builds: decay on the output head, none on embeddings and norms
    assert groups[1] == (False, 2e-3, 0.1, {"output.weight"})
    assert groups[2][:3] == (False, 2e-3, 0.0) and groups[2][3] == set(adamw) - {"output.weight"}
    assert all(p.use_muon == (n in muon) for n, p in model.named_parameters())  # what DeepSpeed's ZeRO reads
    assert isinstance(optimizer.aux_optimizer, torch.optim.AdamW)


def test_the_split_follows_adamw_params():
    model = tiny(tie_embeddings=True)
    muon, adamw = muon_split(model, OptimizerConfig(name="muon", adamw_params=["tok_embeddings"]))
    assert "tok_embeddings.weight" in adamw and "output.weight" not in muon + adamw  # tied: one tensor
    model = tiny()
    muon, _ = muon_split(model, OptimizerConfig(name="muon", adamw_params=["tok_embeddings", "layers.1.feed_forward"]))
    assert "output.weight" in muon and not any(n.startswith("layers.1.feed_forward") for n in muon)
    assert "layers.0.feed_forward.w1.weight" in muon
    with pytest.raises(PipelineError, match=r"\['lm_head'\] match no parameter"):
        muon_split(model, OptimizerConfig(name="muon", adamw_params=["tok_embeddings", "lm_head"]))
    with pytest.raises(PipelineError, match="leaves no matrix"):
        muon_split(model, OptimizerConfig(name="muon", adamw_params=["tok_embeddings", "output", "layers"]))


def test_adamw_is_built_as_before():
    model = tiny()
    train, ds = TrainConfig(), DeepSpeedConfig()
    optimizer = build_optimizer(model, train, ds, torch.device("cpu"), OptimizerConfig())
    assert type(optimizer) is torch.optim.AdamW and not any(hasattr(p, "use_muon") for p in model.parameters())
    assert all("lr_ratio" not in g for g in optimizer.param_groups)  # the trainer sets lr × 1: unchanged
    assert deepspeed_config(train, DeepSpeedConfig(stage=3), PrecisionConfig(), 1, 1, OptimizerConfig()) == \
        deepspeed_config(train, DeepSpeedConfig(stage=3), PrecisionConfig(), 1, 1)
    assert optimizer_inputs(OptimizerConfig()) == {}  # an AdamW run's stage records are the same as before
    assert optimizer_inputs(MUON)["optimizer"]["name"] == "muon"


def test_deepspeed_json_under_muon():
    train = TrainConfig(grad_clip=1.0)
    zero3 = deepspeed_config(train, DeepSpeedConfig(stage=3), PrecisionConfig(), 1, 1, MUON)
    assert zero3["zero_optimization"]["reduce_scatter"] is False  # DeepSpeed's ZeRO 3 refuses Muon with it
    assert zero3["gradient_clipping"] == 0.0  # the norm DeepSpeed clips would be that of Muon's updates
    clipped = OptimizerConfig(name="muon", muon_grad_clip=True)
    zero2 = deepspeed_config(train, DeepSpeedConfig(stage=2), PrecisionConfig(), 1, 1, clipped)
    assert zero2["gradient_clipping"] == 1.0 and "reduce_scatter" not in zero2["zero_optimization"]


@pytest.mark.parametrize("opt,ds,match", [
    (OptimizerConfig(name="sgd"), DeepSpeedConfig(), "optimizer=adamw or optimizer=muon"),
    (MUON, DeepSpeedConfig(name="zero3_offload", stage=3, offload_optimizer=True, offload_param=True),
     "does not run with offload"),
    (MUON, DeepSpeedConfig(stage=2, offload_optimizer=True), "does not run with offload"),
    (OptimizerConfig(name="muon", muon_lr_ratio=0), DeepSpeedConfig(), "muon_lr_ratio=0"),
    (OptimizerConfig(name="muon", momentum=1.0), DeepSpeedConfig(), "momentum=1.0"),
    (OptimizerConfig(name="muon", ns_method="svd"), DeepSpeedConfig(), "ns_method='svd'"),
])
def test_bad_optimizer_settings_are_refused(opt, ds, match):
    with pytest.raises(PipelineError, match=match):
        validate_optimizer(opt, ds)


def test_adamw_settings_pass_whatever_the_muon_keys():
    validate_optimizer(OptimizerConfig(momentum=7.0), DeepSpeedConfig(name="zero3_offload", stage=3,
                                                                      offload_optimizer=True, offload_param=True))
    for stage in (0, 1, 2, 3):
        validate_optimizer(MUON, DeepSpeedConfig(stage=stage))


def test_unsupported_combinations_end_with_one_error_line(tmp_path):
    for overrides, match in ((["optimizer=muon", "deepspeed=zero3_offload"], "does not run with offload"),
                             (["optimizer=muon", "optimizer.ns_method=svd"], "ns_method"),
                             (["optimizer=lion"], "optimizer")):
        proc = run_config_checks(f"run_dir={tmp_path}", "stages=[pretrain]", *overrides)  # the entry point's checks
        errors = error_lines(proc)
        assert proc.returncode != 0 and len(errors) == 1 and match in errors[0], proc.stderr[-2000:]


# -- for real: 2 CPU ranks (run_on_ranks; the CLI where a run is killed or must end in an error line) --------
from conftest import (  # noqa: E402
    TINY,
    Launch,
    checkpoints,
    fresh_run,
    pretrain_cli,  # noqa: E402
    records,
    run_in_process,
    run_on_ranks,
    same_state,
    skip_records,
    tensors,
)


def pretrain(run_dir, *overrides: str, env: dict | None = None) -> str:
    """`python -m pipeline stages=[pretrain]` with TINY, then `overrides`, on 2 ranks (run_on_ranks)."""
    return run_on_ranks(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *overrides, env=env)


def momentum(run_dir, step: int) -> list[torch.Tensor]:
    """Every rank's Muon momentum partition in checkpoint `step`."""
    found = []
    for file in sorted((checkpoints(run_dir) / tag_for(step)).glob("*optim_states.pt")):
        state = torch.load(file, weights_only=False)["optimizer_state_dict"]
        inner = state.get("base_optimizer_state") or state["optimizer_state_dict"]
        found += [s["momentum_buffer"] for s in inner["state"].values() if "momentum_buffer" in s]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [("zero0", "fp32"), ("zero1", "fp32"), ("zero2", "bf16"),
                                            ("zero3", "fp32")])
def test_muon_trains_under_every_zero_stage_and_the_loss_falls(tmp_path, data_run, zero, precision):
    run_dir = fresh_run(data_run, tmp_path)
    pretrain(run_dir, "optimizer=muon", f"deepspeed={zero}", f"precision={precision}", "train.max_steps=30",
             "train.eval_interval=30", "launch.nproc_per_node=2")
    losses = records(run_dir)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0, losses
    assert records(run_dir, "val_loss")[30] < losses[1]
    lrs = records(run_dir, "lr")
    assert lrs[30] < lrs[10]  # the schedule's lr, which Muon's groups follow × muon_lr_ratio
    if zero != "zero0":  # ZeRO 0 keeps its optimizer state in the model file
        buffers = momentum(run_dir, 30)
        assert buffers and all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in buffers)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_muon_resumes_bit_exact_after_a_kill(tmp_path, data_run, zero):
    """fp32: the whole process tree SIGKILLed once step 4's checkpoint is complete, then resumed: every
    loss equals an uninterrupted run's to the bit (Muon's momentum comes back from the checkpoint)."""
    args = ("optimizer=muon", f"deepspeed={zero}", "precision=fp32", "train.max_steps=8", "train.save_interval=2",
            "train.eval_interval=4", "launch.nproc_per_node=2", "model.dropout=0.1")
    reference = fresh_run(data_run, tmp_path / "reference")
    pretrain(reference, *args)
    run_dir = fresh_run(data_run, tmp_path / "killed")
    complete = checkpoints(run_dir) / tag_for(4) / "complete.json"
    launch = Launch(run_dir, args, None, "killed")  # the CLI's whole process tree, SIGKILLed
    assert launch.finish(kill_when=complete.is_file) != 0
    assert not (checkpoints(run_dir) / tag_for(8) / "complete.json").exists()
    pretrain(run_dir, *args)
    resumed, expected = records(run_dir), records(reference)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]
    assert records(run_dir, "val_loss") == records(reference, "val_loss")
    assert any("resumed_from" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    # Muon's state cannot continue as AdamW's: refused before the ranks start (the ranks check it again)
    other = [a if a != "optimizer=muon" else "optimizer=adamw" for a in args if not a.startswith("train.max_steps")]
    proc = pretrain_cli(run_dir, *other, "train.max_steps=10", check=False)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "was written with optimizer=muon, this run has optimizer=adamw" in errors[0], errors
    assert "local ranks" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    with pytest.raises(AssertionError, match="was written with optimizer=muon"):  # under a launcher: the ranks
        pretrain(run_dir, *other, "train.max_steps=10")


@pytest.mark.slow
def test_a_skipped_update_leaves_muon_weights_and_momentum_as_they_were(tmp_path, data_run):
    """ZeRO 2: rank 1's loss ×1000 at step 4 (finite: DeepSpeed would apply it, and would commit the momentum
    it folded the gradient into) is skipped by the spike guard; rank 0's loss is NaN at step 7. Neither
    update moves the weights, the AdamW moments or Muon's momentum; the updates around them do."""
    run_dir = fresh_run(data_run, tmp_path)
    pretrain(run_dir, "optimizer=muon", "deepspeed=zero2", "precision=fp32", "train.max_steps=8",
             "train.save_interval=1", "train.keep_last=20", "train.eval_interval=100", "train.spike_threshold=5",
             "train.spike_window=2", env={"PIPELINE_TEST_NAN_AT": "4:1:1000,7:0"})
    skips = skip_records(run_dir)
    assert sorted(skips) == [4, 7] and skips[4]["skipped_update"].startswith("loss spike")
    assert skips[7]["skipped_update"] == "non-finite loss"
    partitions = "*optim_states.pt"  # fp32 partitions, AdamW's moments and step, Muon's momentum
    for skipped in (4, 7):
        assert same_state(run_dir, skipped - 1, skipped, partitions), skipped
        assert all(torch.equal(a, b) for a, b in zip(momentum(run_dir, skipped - 1), momentum(run_dir, skipped)))
        assert not same_state(run_dir, skipped, skipped + 1, partitions)
    assert all(torch.isfinite(t).all() for t in tensors(next((checkpoints(run_dir) / tag_for(8)).glob(partitions)))
               if t.is_floating_point())


@pytest.mark.slow
def test_a_muon_checkpoint_exports_and_finetunes(tmp_path, data_run):
    """ZeRO 3 Muon pretraining, then fine-tuning with Muon from it and the HF export of both."""
    run_dir = fresh_run(data_run, tmp_path)
    command = (f"run_dir={run_dir}", *TINY, "optimizer=muon", "deepspeed=zero3", "precision=fp32",
               "train.max_steps=6", "train.eval_interval=6", "finetune.max_steps=4", "finetune.eval_interval=4",
               "finetune.eval_exact_match=0", "finetune.micro_batch_size=2", "finetune.global_batch_size=4",
               "finetune.seq_len=64", "export.dtype=float32")
    # as the CLI runs stages=[pretrain,finetune,export]: the training stages on the ranks, then export in its process
    run_on_ranks(*command, "stages=[pretrain,finetune]")
    proc = run_in_process(*command, "stages=[export]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import LlamaForCausalLM

    for source in ("pretrain", "finetune"):
        model = LlamaForCausalLM.from_pretrained(run_dir / "export" / source)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finetuned = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "finetune" and math.isfinite(r.get("loss", math.nan)) for r in finetuned)
