"""The pretrain stage for real: 2 CPU ranks over gloo, DeepSpeed ZeRO 1/2/3, the `tiny` model.

The ZeRO runs are conftest's session fixture `zero_run` (test_export exports the same runs), the resume
reference is `uninterrupted` (test_faults' kill matrix compares against it too), the built-in corpus run is
`builtin_pretrained` (test_finetune fine-tunes it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    RESUME,
    STEPS,
    TINY,
    ZERO_STEPS,
    checkpoint_copy,
    error_lines,
    fresh_run,
    pretrain_cli,
    records,
    run_config_checks,
    run_on_ranks,
)


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [("zero1", "fp32"), ("zero2", "bf16"), ("zero3", "fp32"),
                                            ("zero3_offload", "bf16")])
def test_zero_stages_train_and_the_loss_falls(zero_run, zero, precision):
    run_dir = zero_run(zero, precision)
    losses = records(run_dir)
    assert ZERO_STEPS == 30 and sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0, losses
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_record = next(r for r in reversed(last) if "loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens_seen", "memory_gb"):
        assert train_record[key] is not None, key
    assert "mfu" in train_record  # null on CPU: there is no peak to compare against
    assert records(run_dir, "val_loss")[30] < losses[1]
    saves = [r for r in last if "checkpoint_blocked_s" in r]  # one per save (save_interval 100: the last)
    assert [r["step"] for r in saves] == [30] and 0 < saves[0]["checkpoint_blocked_s"] <= saves[0]["checkpoint_complete_s"]
    record = json.loads((run_dir / "stages" / "pretrain.json").read_text())
    assert any(name.endswith("complete.json") for name in record["outputs"])


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_gradient_accumulation(tmp_path, small_run, two_local_ranks):
    """The 2-rank side is conftest's `two_local_ranks` (test_launch's launchers compare against it too), the
    rank of the other one started by run_on_ranks."""
    one_rank = fresh_run(small_run, tmp_path)
    run_on_ranks(f"run_dir={one_rank}", "stages=[pretrain]", *TINY, *STEPS, world_size=1)
    curves = {ranks: [records(run_dir)[s] for s in range(1, 9)] for ranks, run_dir in ((1, one_rank),
                                                                                      (2, two_local_ranks))}
    np.testing.assert_allclose(curves[1], curves[2], rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_bf16_without_zero_trains_like_zero2(zero_run):
    """DeepSpeed's no-ZeRO bf16 optimizer steps once at construction; the engine undoes it."""
    curves = {zero: [records(zero_run(zero, "bf16"))[s] for s in range(1, 6)] for zero in ("zero0", "zero2")}
    np.testing.assert_allclose(curves["zero0"], curves["zero2"], rtol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("skip", ["", "rng", "loader"])
def test_resume_is_bit_exact_and_needs_the_rng_and_loader_state(tmp_path, uninterrupted, skip):
    """Resumed (run_on_ranks) from step 6's checkpoint of conftest's `uninterrupted` run, as a kill right after
    it would leave the run (test_faults' kill matrix kills launches for real, at many points, and checks the
    same): steps 7..12 equal the uninterrupted run's to the bit; with the RNG (dropout) or loader state not
    restored, they differ."""
    reference = uninterrupted("zero2").result()
    run_dir = checkpoint_copy(reference, tmp_path / "run", step=6)
    env = {"PIPELINE_TEST_SKIP_RESTORE": skip} if skip else None
    logged = run_on_ranks(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "deepspeed=zero2", *RESUME, env=env)
    assert "resumed from" in logged
    assert records(run_dir, "resumed_from") == {6: str(run_dir.resolve() / "pretrain" / "checkpoints" / "step_00000006")}
    resumed, expected = records(run_dir), records(reference)
    after = range(7, 13)
    if skip:
        assert [resumed[s] for s in after] != [expected[s] for s in after]
    else:
        assert [resumed[s] for s in after] == [expected[s] for s in after]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp16_on_a_cpu_gives_one_error_line(tmp_path, data_run):
    """Through the CLI: refused by the ranks (DeepSpeed's CPU accelerator has no fp16). The rank count that
    does not divide the batch is test_bad_inputs' "batch not divisible by the ranks"; a sequence beyond the
    model, the next test."""
    proc = pretrain_cli(fresh_run(data_run, tmp_path), "precision=fp16", check=False)
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and "precision=fp16 is not supported" in error_lines(proc)[0], \
        proc.stderr[-3000:]


def test_a_sequence_beyond_the_model_is_refused_before_any_work(tmp_path):
    """The entry point's own check (run_config_checks: no process, no run_dir)."""
    proc = run_config_checks(f"run_dir={tmp_path / 'run'}", "stages=[pretrain]", *TINY, "train.seq_len=4096")
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and "exceeds model.max_seq_len" in error_lines(proc)[0], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def unigram_entropy(run_dir: Path) -> float:
    """Entropy (nats) of the train tokens' unigram distribution: the loss of a model that ignores context."""
    from pipeline.data.stream import manifest_sources, open_split

    counts = 0
    for source in manifest_sources(run_dir / "shards"):  # the blend's shares are close to the sources' own
        stream = open_split(run_dir / "shards", "train", run_dir / "tokenizer" / "tokenizer.model", verify="off",
                            source=source)
        counts = counts + np.bincount(stream.read(0, stream.num_tokens), minlength=1 << 16).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_the_built_in_corpus_is_learned_well_below_unigram_entropy(builtin_pretrained):
    val = records(builtin_pretrained, "val_loss")
    entropy = unigram_entropy(builtin_pretrained)
    assert val[50] > val[100]
    assert val[100] < 0.5 * entropy, (val, entropy)
