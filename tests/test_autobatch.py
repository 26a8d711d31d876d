"""micro_batch_size=auto (pipeline/train/autobatch.py): the search, real CPU probes, bad values, and training on 2
ranks."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, error_lines, fresh_run, run_config_checks, run_on_ranks

from pipeline.config import DeepSpeedConfig, ModelConfig, PrecisionConfig, TrainConfig
from pipeline.data.batching import BatchLayout
from pipeline.errors import PipelineError
from pipeline.train import autobatch


def test_candidates_are_the_divisors_of_global_over_ranks():
    assert BatchLayout.micro_batch_choices(TrainConfig(micro_batch_size="auto", global_batch_size=24), "train", 2) == \
        [1, 2, 3, 4, 6, 12]
    with pytest.raises(PipelineError, match="not a multiple of the 4 data-parallel ranks"):
        BatchLayout.micro_batch_choices(TrainConfig(micro_batch_size="auto", global_batch_size=10), "train", 4)


def test_search_takes_the_largest_fitting_candidate_in_few_probes():
    cands = [1, 2, 4, 8, 16, 32, 64]
    calls = []

    def affine(b):  # 100 bytes fixed, 10 per sequence; out of memory from 32 on
        calls.append(b)
        return None if b >= 32 else 100 + 10 * b

    choice = autobatch.search(affine, cands, budget=100 + 10 * 20, extra=0)
    assert choice.micro_batch == 16 and len(calls) <= 4, calls
    choice = autobatch.search(affine, cands, budget=10**9, extra=0)
    assert choice.micro_batch == 16 and choice.measured[32] is None
    # the unprobed optimizer state counts against the budget too
    assert autobatch.search(affine, cands, budget=100 + 10 * 20, extra=100).micro_batch == 8
    assert autobatch.search(affine, cands, budget=50, extra=0).micro_batch == 0
    # noise at the small probes makes the first line far too flat: the probe that does not fit refits it
    calls.clear()
    noisy = autobatch.search(lambda b: calls.append(b) or (105 if b == 2 else 100 + 10 * b), cands, budget=300,
                             extra=0)
    assert noisy.micro_batch == 16 and len(calls) <= 5, calls
    # CPU: with no OOM to catch, nothing is probed whose need could exceed the RAM (`limit`), even when the
    # line says everything fits
    calls.clear()
    capped = autobatch.search(lambda b: calls.append(b) or (100 if b == 2 else 100 + 10 * b), cands,
                              budget=10**6, extra=0, limit=500)
    assert capped.micro_batch == 16 and max(100 + 10 * b for b in calls) <= 500, calls


def test_optimizer_state_estimate_follows_the_zero_stage():
    p = 1000
    assert autobatch.unprobed_bytes(p, "bf16", DeepSpeedConfig(stage=0), 2, "cpu") == 12 * p
    assert autobatch.unprobed_bytes(p, "fp32", DeepSpeedConfig(stage=1), 2, "cpu") == 8 * p // 2
    assert autobatch.unprobed_bytes(p, "bf16", DeepSpeedConfig(stage=2), 2, "cpu") == 12 * p // 2 + 4 * p // 2
    assert autobatch.unprobed_bytes(p, "bf16", DeepSpeedConfig(stage=2, offload_optimizer=True), 2, "cuda") == 4 * p // 2


@pytest.mark.slow
def test_cpu_probes_a_small_budget_picks_a_smaller_micro_batch():
    """Real forward and backward passes of a small model on the CPU, measured by RSS."""
    # vocab 4096: the loss's fp32 logits, 2 MiB per sequence of 128 (built 1024 positions at a time), dominate
    model = ModelConfig(vocab_size=4096)
    train = TrainConfig(seq_len=128, micro_batch_size="auto", global_batch_size=16)
    args = (train, "train", model, DeepSpeedConfig(stage=0), PrecisionConfig(name="bf16"), torch.device("cpu"))
    large = autobatch.choose_micro_batch(*args, budget=64 * 2**30)
    assert large.micro_batch == 16
    need_1, need_16 = large.need(1), large.need(16)
    assert need_16 > need_1 + 40 * 2**20, large.measured  # activations and logits grow with the micro batch
    small = autobatch.choose_micro_batch(*args, budget=(need_1 + need_16) // 2)
    assert 1 <= small.micro_batch < 16 and 16 % small.micro_batch == 0, small.measured
    assert small.need(small.micro_batch) <= small.budget  # it was confirmed by a probe of its own
    with pytest.raises(PipelineError, match="not even a micro batch of 1 fits"):
        autobatch.resolve(TrainConfig(seq_len=128, micro_batch_size="auto", global_batch_size=16,
                                      auto_memory_fraction=1e-9), "train", *args[2:])
    fixed = TrainConfig(micro_batch_size=4)
    assert autobatch.resolve(fixed, "train", *args[2:]) is fixed  # a number is taken as is, with no probe


@pytest.mark.parametrize("overrides,phrase", [
    (("train.micro_batch_size=big",), "train.micro_batch_size='big': give a whole number of sequences, or auto"),
    (("train.micro_batch_size=2.5",), "train.micro_batch_size=2.5: give a whole number"),
    (("train.micro_batch_size=auto", "train.auto_memory_fraction=1.5"), "train.auto_memory_fraction=1.5 must lie"),
    (("stages=[finetune]", "finetune.micro_batch_size=true"), "finetune.micro_batch_size=True: give a whole"),
])
def test_bad_values_give_one_error_line(tmp_path, overrides, phrase):
    proc = run_config_checks(f"run_dir={tmp_path}", "stages=[pretrain]", *overrides)
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and phrase in error_lines(proc)[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_auto_micro_batch_trains_on_two_ranks(tmp_path, small_run):
    """The pretrain stage on 2 ranks (conftest.run_on_ranks: the output of both is searched)."""
    fresh_run(small_run, tmp_path)
    output = run_on_ranks(f"run_dir={tmp_path}", "stages=[pretrain]", *TINY, "train.micro_batch_size=auto",
                          "train.max_steps=3", "train.eval_interval=3", "train.save_interval=3",
                          "launch.nproc_per_node=2", "deepspeed=zero1", timeout=300)
    chosen = [line for line in output.splitlines() if "train.micro_batch_size=auto:" in line]
    assert len(chosen) == 1, output[-4000:]  # rank 0 alone reports it
    micro = int(chosen[0].split("train.micro_batch_size=auto:")[1].split()[0])
    assert micro == 4  # plenty of RAM for the tiny model: the largest divisor of 8 / 2 ranks
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in steps if "loss" in r) == [1, 2, 3]
