"""Bad input and config, stage by stage: each case exits non-zero with exactly one `error:` line that names
the problem, no traceback, and leaves nothing that looks finished (no completion record of the failed stage,
no new tokenizer, manifest, checkpoint record, weights or staging folder). The config matrix runs through the
entry point's own checks in-process (conftest.run_config_checks), the input matrix in-process through the
entry point and the runner (run_in_process), each with a few cases through the real CLI as well; what the
ranks find goes through the real CLI.

Covered elsewhere, not repeated here: bad corpora, globs, vocab sizes and a non-SentencePiece .model at the
tokenize stage (test_data_inputs.py; here the corpus cases hit the shard stage), SFT record shapes as data
(test_finetune.py; here through a run: no assistant turn, an unknown shape).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from conftest import TINY, error_lines, run_cli, run_config_checks, run_in_process, write_jsonl

# What a finished stage leaves behind; none of it may appear because of a failed run.
FINISHED = ("stages/*.json", "tokenizer/tokenizer.model", "shards/manifest.json", "shards.tmp", "shards.parts",
            "**/complete.json", "**/latest", "export/*", "**/*.safetensors", "**/*.tmp")


def finished(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for pattern in FINISHED for p in run_dir.glob(pattern)}


def assert_fails_well(proc, phrase: str, run_dir: Path, stage: str, before: set[str]) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    left = finished(run_dir)
    assert f"stages/{stage}.json" not in left
    assert left <= before, left - before


# -- config: caught before run_dir is even created --------------------------------------------------

# The default stages (all six on the built-in corpus): a bad value must stop the run before any of them.
CONFIG_CASES = {
    "unknown model preset": (["model=nope"], "Could not find 'model/nope'"),
    "unknown stage": (["stages=[tokenize,shard,pretrain,exprot]"], "unknown stage(s) ['exprot']"),
    "no stage": (["stages=[]"], "stages=[] runs nothing"),
    # and without Hydra's advice to append it as +train.nope=1, which the closed schema refuses as well
    "unknown key": (["train.nope=1"], "Could not override 'train.nope'. Key 'nope' not in 'TrainConfig'"),
    "unknown key appended": (["+train.nope=1"], "unknown config key(s) ['train.nope']"),
    "wrong type": (["train.max_steps=abc"], "could not be converted to Integer"),
    "zero steps": (["train.max_steps=0"], "train.max_steps=0: must be at least 1"),
    "zero interval": (["finetune.log_interval=0"], "finetune.log_interval=0: must be at least 1"),
    "val fraction above 1": (["data.val_fraction=1.5"], "data.val_fraction=1.5 must lie in [0, 1)"),
    "seq_len beyond the model": (["train.seq_len=1024"], "train.seq_len=1024 exceeds model.max_seq_len=512"),
    "batch not a multiple of micro batch": (["train.micro_batch_size=4", "train.global_batch_size=6"],
                                            "train.global_batch_size=6 is not a multiple"),
    "unknown schedule": (["train.schedule=linear"], "train.schedule='linear': choose cosine"),
    "heads do not divide dim": (["model.n_heads=3"], "model.n_heads=3"),
    "negative rank count": (["launch.nproc_per_node=-1"], "launch.nproc_per_node=-1 must be at least 0"),
    "eval batch size zero": (["eval.batch_size=0"], "eval.batch_size=0: give a whole number of at least 1, or auto"),
    "unknown eval source": (["eval.source=base"], "eval.source='base': choose pretrain, finetune or all"),
    "eval include_path not a folder": (["eval.include_path=[/nonexistent/tasks]"], "is not a folder"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_stops_before_any_work(tmp_path, name):
    overrides, phrase = CONFIG_CASES[name]
    run_dir = tmp_path / "run"
    # a check that is missed would start the whole pipeline: run_config_checks raises where it would
    proc = run_config_checks(f"run_dir={run_dir}", *overrides)
    assert_fails_well(proc, phrase, run_dir, "tokenize", set())
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unknown key", "zero steps"])  # Hydra's composition; our validation
def test_bad_config_through_the_real_cli(tmp_path, name):
    overrides, phrase = CONFIG_CASES[name]
    run_dir = tmp_path / "run"
    # a check that is missed would start the whole pipeline: the timeout turns that into a failure
    proc = run_cli(f"run_dir={run_dir}", *overrides, timeout=90)
    assert_fails_well(proc, phrase, run_dir, "tokenize", set())
    assert not run_dir.exists()


# -- inputs: each case prepares a run (mostly a copy of `small_run`) -------------------------------

Setup = Callable[[Path, Path], tuple[Path, list[str]]]  # (tmp_path, small_run) -> (run_dir, overrides)
TINY_PRETRAIN = ("stages=[pretrain]", *TINY, "train.max_steps=2", "launch.nproc_per_node=1")


def copied(small_run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(small_run, tmp / "run"))


def shard_stage(corpus: Callable[[Path], Path]) -> Setup:
    """A run holding small_run's tokenizer and nothing else: the corpus is read by the shard stage (its
    twin at the tokenize stage is in test_data_inputs.py)."""
    def setup(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
        run_dir = tmp / "run"
        shutil.copytree(small_run / "tokenizer", run_dir / "tokenizer")
        return run_dir, ["data=files", f"data.paths=[{corpus(tmp)}]", "stages=[shard]"]
    return setup


def empty_corpus(tmp: Path) -> Path:
    return write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": " \n\t "}, {"text": None}])


def wrong_field(tmp: Path) -> Path:
    return write_jsonl(tmp / "body.jsonl", [{"body": "a document under another field"}] * 20)


def malformed(tmp: Path) -> Path:
    path = tmp / "broken.jsonl"
    path.write_text('{"text": "a fine record"}\n' * 20 + '{"text": "cut off here\n' + '{"text": "fine again"}\n')
    return path


def corpus_of(small_run: Path) -> str:
    return yaml.safe_load((small_run / "config.yaml").read_text())["data"]["paths"][0]


def tokenizer_path(target: Callable[[Path, Path], Path]) -> Setup:
    def setup(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
        return tmp / "run", ["data=files", f"data.paths=[{corpus_of(small_run)}]",
                             f"tokenizer.path={target(tmp, small_run)}", "stages=[tokenize,shard]"]
    return setup


def hf_tokenizer_json(tmp: Path, small_run: Path) -> Path:
    path = tmp / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    return path


def run_dir_is_a_file(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    blocker = tmp / "run"
    blocker.write_text("not a folder")
    return blocker, ["stages=[tokenize]"]


def no_shards(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    run_dir = copied(small_run, tmp)
    shutil.rmtree(run_dir / "shards")
    (run_dir / "stages" / "shard.json").unlink()
    return run_dir, list(TINY_PRETRAIN)


def other_tokenizer(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    """small_run's shards beside a tokenizer trained on the same corpus with another vocabulary."""
    from pipeline.config import DataConfig, TokenizerConfig
    from pipeline.data.corpus import Corpus
    from pipeline.stages.tokenize import train_tokenizer

    run_dir = copied(small_run, tmp)
    train_tokenizer(Corpus([Path(corpus_of(small_run))], DataConfig(source="files")), TokenizerConfig(vocab_size=500),
                    run_dir / "tokenizer" / "tokenizer.model", seed=0)
    return run_dir, list(TINY_PRETRAIN)


def batch_not_divisible_by_ranks(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), [*TINY_PRETRAIN, "train.global_batch_size=6", "launch.nproc_per_node=2"]


def resume_from_nowhere(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), [*TINY_PRETRAIN, f"train.resume={tmp / 'nonexistent'}"]


def gpt2_folder(tmp: Path) -> Path:
    folder = tmp / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                    "vocab_size": 50257, "n_embd": 768, "n_layer": 12}))
    (folder / "model.safetensors").write_bytes(b"")  # present, so only the architecture can be refused
    return folder


def finetune_from_gpt2(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), ["stages=[finetune]", f"finetune.init={gpt2_folder(tmp)}",
                                    "launch.nproc_per_node=1"]


def finetune_from_nowhere(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), ["stages=[finetune]", f"finetune.init={tmp / 'nonexistent'}",
                                    "launch.nproc_per_node=1"]


def finetune_without_pretrain(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    """The tokenizer and data, no pretrain checkpoint to start from (finetune.init=pretrain, the default)."""
    return copied(small_run, tmp), ["stages=[finetune]", "launch.nproc_per_node=1"]


def export_without_finetune(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), ["stages=[export]", "export.source=finetune"]


def eval_without_export(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    return copied(small_run, tmp), ["stages=[eval]", "eval.tasks=[hellaswag]"]


# name: (setup, the stage that must fail, a phrase of its error line)
INPUT_CASES: dict[str, tuple[Setup, str, str]] = {
    "missing corpus path": (shard_stage(lambda tmp: tmp / "nope.jsonl"), "shard", "nope.jsonl' does not exist"),
    "empty corpus": (shard_stage(empty_corpus), "shard", "the corpus has no non-empty document"),
    "wrong text field": (shard_stage(wrong_field), "shard", "body.jsonl: no field 'text' (columns: body)"),
    "malformed jsonl": (shard_stage(malformed), "shard", "broken.jsonl: cannot read as json"),
    "tokenizer.path is a folder": (tokenizer_path(lambda tmp, run: run / "tokenizer"), "tokenize",
                                   "is a folder: point tokenizer.path at the SentencePiece .model file"),
    "tokenizer.path is an HF tokenizer.json": (tokenizer_path(hf_tokenizer_json), "tokenize",
                                               "tokenizer.json is not a SentencePiece model"),
    "run_dir is a file": (run_dir_is_a_file, "tokenize", "cannot be created"),
    "pretrain without shards": (no_shards, "pretrain", "manifest.json does not exist: run stages=[shard] first"),
    "shards of another tokenizer": (other_tokenizer, "pretrain", "shards were written with another tokenizer"),
    "batch not divisible by the ranks": (batch_not_divisible_by_ranks, "pretrain",
                                         "train.global_batch_size=6 is not a multiple of train.micro_batch_size × "
                                         "data-parallel ranks = 2 × 2 = 4"),
    "resume from a missing folder": (resume_from_nowhere, "pretrain", "nonexistent' is not a folder"),
    "finetune from a GPT-2 folder": (finetune_from_gpt2, "finetune", "is not a LlamaForCausalLM export"),
    "finetune from a missing folder": (finetune_from_nowhere, "finetune", "config.json does not exist"),
    "finetune without a pretrain checkpoint": (finetune_without_pretrain, "finetune",
                                               "no complete pretrain checkpoint"),
    "export of a finetune that never ran": (export_without_finetune, "export", "no complete finetune checkpoint"),
    "eval with no export": (eval_without_export, "eval", "no export under"),
}


def assert_fails_before_its_stage_starts(tmp_path: Path, small_run: Path, name: str, run) -> None:
    setup, stage, phrase = INPUT_CASES[name]
    run_dir, overrides = setup(tmp_path, small_run)
    before = finished(run_dir) if run_dir.is_dir() else set()
    proc = run(f"run_dir={run_dir}", *overrides)
    assert_fails_well(proc, phrase, run_dir, stage, before)
    assert "local ranks" not in proc.stdout + proc.stderr  # as in "pretrain: starting 2 local ranks"


@pytest.mark.parametrize("name", list(INPUT_CASES))
def test_bad_input_fails_before_its_stage_starts(tmp_path, small_run, name):
    """None of these start local ranks: the runner checks them first (runner.preflight for the training
    stages). In-process (run_in_process: the entry point and the runner as the CLI runs them; starting
    local ranks would raise); a case of each stage goes through the real CLI below as well."""
    assert_fails_before_its_stage_starts(tmp_path, small_run, name, run_in_process)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tokenizer.path is a folder", "missing corpus path", "pretrain without shards",
                                  "finetune from a GPT-2 folder", "export of a finetune that never ran"])
def test_bad_input_through_the_real_cli(tmp_path, small_run, name):
    assert_fails_before_its_stage_starts(tmp_path, small_run, name, lambda *args: run_cli(*args, timeout=120))


# -- found by the ranks themselves: every shard byte is hashed, every SFT record parsed ------------------

def corrupt_shard(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    run_dir = copied(small_run, tmp)
    path = next((run_dir / "shards" / "train").glob("*.bin"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    return run_dir, [*TINY_PRETRAIN, "launch.nproc_per_node=2"]  # both ranks find it; one error line


def out_of_vocab_shard(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
    """A shard rewritten with some ids past the vocabulary, its manifest entry updated to match (size, hashes),
    as a writer with another tokenizer or a bug would leave it."""
    from pipeline.data.indexed import IndexedDataset, IndexedDatasetWriter

    run_dir = copied(small_run, tmp)
    manifest_path = run_dir / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    info = manifest["sources"]["corpus"]["splits"]["train"]["shards"][0]
    prefix = run_dir / "shards" / "train" / info["prefix"]
    shard = IndexedDataset(prefix)
    tokens, sizes = np.array(shard.tokens), np.array(shard.sizes)
    del shard
    tokens[::97] = manifest["vocab_size"] + 7  # fits the uint16 dtype, outside the vocabulary
    writer = IndexedDatasetWriter(prefix, np.dtype(manifest["dtype"]))
    writer.add_documents(tokens, sizes)
    info.update(asdict(writer.finalize()))
    manifest_path.write_text(json.dumps(manifest))
    return run_dir, list(TINY_PRETRAIN)


def llama_folder(folder: Path, vocab_size: int) -> Path:
    """A random tiny HF LlamaForCausalLM folder (config.json and safetensors), a valid finetune.init."""
    from safetensors.torch import save_file

    from pipeline.config import ModelConfig
    from pipeline.hf.llama import to_hf_config, to_hf_state_dict
    from pipeline.train.model import Transformer

    cfg = ModelConfig(vocab_size=vocab_size)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file(to_hf_state_dict(Transformer(cfg).state_dict(), cfg), str(folder / "model.safetensors"))
    return folder


def finetune_on(records: list[dict], name: str = "sft.jsonl") -> Setup:
    """A finetune from a tiny HF folder on SFT `records`: the ranks parse them."""
    def setup(tmp: Path, small_run: Path) -> tuple[Path, list[str]]:
        run_dir = copied(small_run, tmp)
        vocab = json.loads((run_dir / "shards" / "manifest.json").read_text())["vocab_size"]
        sft = write_jsonl(tmp / name, records)
        return run_dir, ["stages=[finetune]", f"finetune.init={llama_folder(tmp / 'hf', vocab)}",
                         f"finetune.data.paths=[{sft}]", "finetune.seq_len=64", "finetune.micro_batch_size=2",
                         "finetune.global_batch_size=2", "finetune.max_steps=2", "finetune.eval_exact_match=0",
                         "launch.nproc_per_node=1"]
    return setup


finetune_without_answer = finetune_on([{"prompt": "q", "response": "a"}, {"prompt": "a question, no answer"}])


RANK_CASES: dict[str, tuple[Setup, str, str]] = {
    "corrupt shard": (corrupt_shard, "pretrain", "sha256 differs from"),
    "token id beyond the vocabulary": (out_of_vocab_shard, "pretrain", "outside the vocabulary [0, 600)"),
    "finetune record without an answer": (finetune_without_answer, "finetune",
                                          "sft.jsonl, record 1 (counting from 0) has no assistant turn"),
    "finetune record of unknown shape": (finetune_on([{"text": "pretraining text, not an instruction"}], "text.jsonl"),
                                         "finetune", "has an unknown shape (fields: ['text']); accepted"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RANK_CASES))
def test_bad_data_found_by_the_ranks(tmp_path, small_run, name):
    setup, stage, phrase = RANK_CASES[name]
    run_dir, overrides = setup(tmp_path, small_run)
    before = finished(run_dir)
    proc = run_cli(f"run_dir={run_dir}", *overrides, timeout=300)
    assert_fails_well(proc, phrase, run_dir, stage, before)
