"""Data mixtures (pipeline/data/mixture.py, shard_sources.py): the blend, its plan, resume, per-source shards and
validation, other tools' shards as sources, and the bad inputs of data.sources."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, error_lines, fresh_run, records, run_config_checks, run_in_process, run_on_ranks, write_jsonl

from pipeline.config import DataConfig, PhaseConfig, PipelineConfig, SourceConfig, TokenizerConfig
from pipeline.data.indexed import IndexedDatasetWriter
from pipeline.data.mixture import Blend, MixtureLoader, plan
from pipeline.data.stream import open_split
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, sha256_file
from pipeline.validate import validate

EOS, VOCAB, SEQ = 2, 1000, 16


def mixture_shards(root: Path, tokens: dict[str, int], seed: int = 0) -> tuple[Path, Path]:
    """shards/<source>/train as shard.py writes them, each source's ids in its own range (its id tells the
    source), documents of random length ending with EOS; and a stand-in tokenizer file."""
    rng = np.random.default_rng(seed)
    tokenizer = root / "tokenizer.model"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"stand-in")
    sources = {}
    for index, (name, n) in enumerate(sorted(tokens.items())):
        folder = root / "shards" / name / "train"
        folder.mkdir(parents=True)
        ids = rng.integers(100 * (index + 1), 100 * (index + 2), n).astype(np.uint16)
        ends = np.cumsum(rng.integers(5, 60, n))
        ends = np.append(ends[ends < n], n)
        ids[ends - 1] = EOS
        with IndexedDatasetWriter(folder / "00000", np.uint16) as w:
            w.add_documents(ids, np.diff(np.concatenate([[0], ends])))
            info = asdict(w.finalize())
        empty = {"documents": 0, "tokens": 0, "shards": []}
        sources[name] = {"splits": {"train": {"documents": info["num_documents"], "tokens": n, "shards": [info]},
                                    "val": empty}}
    atomic_write_json(root / "shards" / "manifest.json", {
        "format": "MMIDIDX", "format_version": 2, "tokenizer_sha256": sha256_file(tokenizer), "vocab_size": VOCAB,
        "dtype": "uint16", "eos_id": EOS, "sources": sources})
    return root / "shards", tokenizer


def loader(root: Path, weights: dict[str, float], micro: int, world: int = 1, rank: int = 0, global_batch: int = 32,
           phases=()) -> MixtureLoader:
    shards, tokenizer = root / "shards", root / "tokenizer.model"
    names = sorted(weights)
    streams = {n: open_split(shards, "train", tokenizer, "off", source=n) for n in names}
    return MixtureLoader(streams, Blend(names, weights, list(phases), global_batch), SEQ, micro, global_batch,
                         rank, world, seed=7)


def source_of(inputs: torch.Tensor) -> np.ndarray:
    """The source of each row (ids 100-199: the first source, ...), by majority of its non-EOS tokens."""
    ids = inputs.numpy()
    return np.array([np.bincount(row[row != EOS] // 100).argmax() - 1 for row in ids])


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    mixture_shards(root, {"a": 60_000, "b": 40_000, "c": 3_000})
    return root


WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def steps(ld: MixtureLoader, n: int) -> list[torch.Tensor]:
    return [torch.cat([x for x, _ in ld.next_global_batch()]) for _ in range(n)]


def test_token_shares_follow_the_weights(three):
    ld = loader(three, WEIGHTS, micro=8)
    rows = np.concatenate([source_of(batch) for batch in steps(ld, 10)])  # 320 windows
    shares = np.bincount(rows, minlength=3) / rows.size
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() <= 0.01, shares
    seen = ld.tokens_seen()
    assert seen == {f"tokens_seen/{n}": int(round(w * 320)) * SEQ for n, w in WEIGHTS.items()}


def test_the_same_batches_for_any_ranks_and_micro_batch(three):
    reference = steps(loader(three, WEIGHTS, micro=8), 5)
    for world, micro in ((1, 2), (2, 4), (2, 1), (4, 8)):
        ranks = [loader(three, WEIGHTS, micro=micro, world=world, rank=r) for r in range(world)]
        for step in range(5):
            assert torch.equal(torch.cat([torch.cat([x for x, _ in ld.next_global_batch()]) for ld in ranks]),
                               reference[step]), (world, micro, step)


def test_resume_mid_run_gives_the_uninterrupted_batches(three):
    reference = steps(loader(three, WEIGHTS, micro=4), 8)
    first = loader(three, WEIGHTS, micro=4)
    steps(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert len(json.dumps(state)) < 2000 and state["samples_consumed"] == 3 * 32
    resumed = loader(three, WEIGHTS, micro=2, world=2, rank=0)  # another rank count and micro batch
    other = loader(three, WEIGHTS, micro=2, world=2, rank=1)
    resumed.load_state_dict(state)
    other.load_state_dict(state)
    for step in range(3, 8):
        got = torch.cat([torch.cat([x for x, _ in ld.next_global_batch()]) for ld in (resumed, other)])
        assert torch.equal(got, reference[step]), step
    changed = loader(three, {**WEIGHTS, "c": 0.0}, micro=4)
    changed.load_state_dict(state)  # other weights: allowed (logged); other data is not
    two = loader(three, {"a": 0.5, "b": 0.5}, micro=4)
    with pytest.raises(PipelineError, match="the sources or their shards changed"):
        two.load_state_dict(state)


def test_a_small_source_repeats_and_the_plan_says_so(three, caplog):
    ld = loader(three, WEIGHTS, micro=8)
    with caplog.at_level(logging.INFO, logger="pipeline.data.mixture"):
        planned = plan(ld.blend, dict(zip(ld.names, ld.windows)), SEQ, 100, 32, max_repetitions=4)
    small = next(p for p in planned if p.name == "c")
    assert small.windows == (3000 - 1) // SEQ and small.samples == 640 and small.repetitions > 3
    assert "source c: 187 train windows" in caplog.text and "3.42× repeated" in caplog.text
    rows = np.concatenate([source_of(b) for b in steps(ld, 60)])
    c_windows = torch.cat(steps(loader(three, {"c": 1.0}, micro=8), 24))  # c alone: 768 windows, > 4 epochs
    assert len({tuple(r) for r in c_windows.tolist()}) == small.windows  # every window, each several times
    assert (rows == 2).sum() == round(0.2 * 60 * 32)
    with pytest.raises(PipelineError, match=r"more than data.max_repetitions=2 times \(c 3.42×\)"):
        plan(ld.blend, dict(zip(ld.names, ld.windows)), SEQ, 100, 32, max_repetitions=2)


def test_phases_change_the_weights_at_their_step(three):
    phases = [PhaseConfig(0, {"a": 1.0}), PhaseConfig(2, {"b": 1.0, "c": 1.0})]
    ld = loader(three, WEIGHTS, micro=8, phases=phases)
    batches = [source_of(b) for b in steps(ld, 4)]
    assert all((b == 0).all() for b in batches[:2])
    late = np.concatenate(batches[2:])
    assert (late != 0).all() and abs((late == 1).mean() - 0.5) <= 1 / 64
    first = loader(three, WEIGHTS, micro=8, phases=phases)
    steps(first, 3)
    again = loader(three, WEIGHTS, micro=8, phases=phases)
    again.load_state_dict(first.state_dict())
    assert torch.equal(steps(again, 1)[0], steps(first, 1)[0])


# -- megatron-core's own writer: its shards as a source -------------------------------------------------

def megatron_shards(folder: Path, documents: list[np.ndarray], eod: bool = True) -> Path:
    pytest.importorskip("megatron.core.datasets.indexed_dataset")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    (folder / "train").mkdir(parents=True)
    prefix = folder / "train" / "mega_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.from_numpy((np.append(doc, EOS_OF_RUN) if eod else doc).astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return folder


EOS_OF_RUN = 2  # the pipeline's </s> id (pipeline/data/vocab.py)


def run_documents(run_dir: Path, n: int) -> list[np.ndarray]:
    from conftest import split_documents

    return [np.array(doc[:-1]) for doc in split_documents(run_dir, "prose")["train"][:n]]


def test_megatron_shards_are_a_source_token_for_token(tmp_path, data_run):
    docs = run_documents(data_run, 300)
    mega = megatron_shards(tmp_path / "mega", docs)
    run_dir = tmp_path / "run"
    tokenizer = data_run / "tokenizer" / "tokenizer.model"
    proc = run_in_process(f"run_dir={run_dir}", "stages=[tokenize,shard]", f"tokenizer.path={tokenizer}",
                          "data=files", f"+data.sources.mega.shards={mega}")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    body = manifest["sources"]["mega"]
    assert body["external"] and body["splits"]["train"]["documents"] == 300
    assert not (run_dir / "shards" / "mega").exists()  # referenced, not copied
    stream = open_split(run_dir / "shards", "train", run_dir / "tokenizer" / "tokenizer.model", source="mega")
    assert np.array_equal(stream.read(0, stream.num_tokens),
                          np.concatenate([np.append(d, EOS_OF_RUN) for d in docs]))


@pytest.mark.slow
def test_a_mixture_with_megatron_shards_trains_with_val_loss_per_source(tmp_path, data_run):
    """One launch: the built-in sources plus megatron-core's shards (no val split: no val_loss/mega)."""
    mega = megatron_shards(tmp_path / "mega", run_documents(data_run, 400))
    run_dir = fresh_run(data_run, tmp_path / "run")
    tokenizer = run_dir / "tokenizer" / "tokenizer.model"
    shard = run_in_process(f"run_dir={run_dir}", "stages=[shard]", f"tokenizer.path={tokenizer}",
                           "data.default_num_documents=2000", "data.val_fraction=0.05",
                           f"+data.sources.mega.shards={mega}", "+data.sources.mega.weight=0.3")
    assert shard.returncode == 0, shard.stderr
    logs = run_on_ranks(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "train.max_steps=6", "train.eval_interval=3",
                        f"tokenizer.path={tokenizer}", "data.default_num_documents=2000", "data.val_fraction=0.05",
                        f"+data.sources.mega.shards={mega}", "+data.sources.mega.weight=0.3")
    assert "data: source mega:" in logs and "no val_loss/mega" in logs
    evals = records(run_dir, "val_loss/prose")
    assert sorted(evals) == [3, 6] and sorted(records(run_dir, "val_loss/records")) == [3, 6]
    seen = {n: records(run_dir, f"tokens_seen/{n}")[6] for n in ("mega", "prose", "records")}
    assert sum(seen.values()) == 6 * 8 * 64 and abs(seen["mega"] / sum(seen.values()) - 0.3 / 1.3) < 1 / 48


@pytest.mark.slow  # free in the full suite: test_pretrain makes the same run
def test_the_default_run_reports_each_source(zero_run):
    run_dir = zero_run("zero2", "bf16")
    for source in ("prose", "records"):
        assert records(run_dir, f"val_loss/{source}"), source
        assert records(run_dir, f"tokens_seen/{source}"), source
    report = (run_dir / "report" / "report.md").read_text() if (run_dir / "report" / "report.md").is_file() else ""
    assert not report or "final val loss of prose" in report


# -- bad input ----------------------------------------------------------------------------------------

CONFIG_CASES = {
    "negative weight": (["data.sources.prose.weight=-1"], "data.sources.prose.weight=-1.0 must be a finite number"),
    "all-zero weights": (["data.sources.prose.weight=0", "data.sources.records.weight=0"], "every weight is 0"),
    "weight for an unknown source": (["data.sources.code.weight=0.2"], "Key 'code' is not in struct"),
    "phase weight for an unknown source": (["+data.phases=[{step: 0, weights: {code: 1}}]"],
                                           "weight for unknown source(s) ['code']"),
    "a source without files": (["data=files", "+data.sources.code.weight=1"], "data.sources.code has neither paths"),
    "shards without tokenizer.path": (["+data.sources.ext.shards=/tmp"], "needs tokenizer.path="),
    "unknown source key": (["+data.sources.code.wieght=1"], "Key 'wieght' not in 'SourceConfig'"),
    "bad missing_eos": (["+data.sources.ext.shards=/tmp", "tokenizer.path=/x", "+data.sources.ext.missing_eos=skip"],
                        "choose refuse or append"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_mixture_config_is_an_error_line(tmp_path, name):
    overrides, phrase = CONFIG_CASES[name]
    proc = run_config_checks(f"run_dir={tmp_path / 'run'}", *overrides)
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and phrase in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["a b", "../up", ".hidden", "-dash", "x" * 65])
def test_a_source_name_must_be_a_folder_name(name):
    cfg = PipelineConfig(data=DataConfig(source="files", sources={name: SourceConfig(paths=["a.jsonl"])}))
    with pytest.raises(PipelineError, match="a source name becomes a folder name"):
        validate(cfg)


def bad_shards(kind: str, folder: Path) -> Path:
    (folder / "train").mkdir(parents=True)
    prefix = folder / "train" / "00000"
    if kind == "float":
        with IndexedDatasetWriter(prefix, np.float32) as w:
            w.add_documents(np.array([3.0, 2.0], np.float32), np.array([2]))
            w.finalize()
    elif kind == "header":
        Path(f"{prefix}.bin").write_bytes(b"\0" * 8)
        Path(f"{prefix}.idx").write_bytes(b"TNTIDX\0\0" + b"\0" * 40)  # Megatron's older IndexedDataset
    else:
        tokens = {"beyond": [5, 60000, 2], "no-eos": [5, 6, 7]}[kind]
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_documents(np.array(tokens, np.uint16), np.array([3]))
            w.finalize()
    return folder


@pytest.mark.parametrize("kind,phrase", [("beyond", "outside the vocabulary"), ("float", "declares float32 tokens"),
                                         ("header", "is not an MMIDIDX index"), ("no-eos", "do not end with </s>")])
def test_bad_shards_source_is_an_error_line(tmp_path, data_run, kind, phrase):
    shards = bad_shards(kind, tmp_path / "ext")
    tokenizer = data_run / "tokenizer" / "tokenizer.model"
    proc = run_in_process(f"run_dir={tmp_path / 'run'}", "stages=[tokenize,shard]", f"tokenizer.path={tokenizer}",
                          "data=files", f"+data.sources.ext.shards={shards}")
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and phrase in lines[0], proc.stderr
    assert not (tmp_path / "run" / "shards").exists() and not (tmp_path / "run" / "shards.tmp").exists()


def test_missing_eos_append_writes_a_copy_with_it(tmp_path, data_run):
    shards = bad_shards("no-eos", tmp_path / "ext")
    tokenizer = data_run / "tokenizer" / "tokenizer.model"
    proc = run_in_process(f"run_dir={tmp_path / 'run'}", "stages=[tokenize,shard]", f"tokenizer.path={tokenizer}",
                          "data=files", f"+data.sources.ext.shards={shards}", "+data.sources.ext.missing_eos=append")
    assert proc.returncode == 0, proc.stderr
    stream = open_split(tmp_path / "run" / "shards", "train", tokenizer, source="ext")
    assert stream.read(0, stream.num_tokens).tolist() == [5, 6, 7, EOS_OF_RUN]


def test_a_source_with_no_documents_is_an_error_line(tmp_path, small_corpus):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}])
    proc = run_in_process(f"run_dir={tmp_path / 'run'}", "stages=[tokenize,shard]", "data=files",
                          "tokenizer.vocab_size=600", f"+data.sources.good.paths=[{small_corpus}]",
                          f"+data.sources.empty.paths=[{empty}]")
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and "no non-empty document (source empty)" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "shards").exists()


def test_tokenizer_sample_follows_the_weights():
    from pipeline.stages.tokenize import sample_shares

    assert sample_shares([1000, 100], [0.5, 0.5], max_sample_mb=0) == [1.0, 1.0]  # 0: all of it
    keep = sample_shares([4e6, 4e6], [0.75, 0.25], max_sample_mb=2)
    assert np.allclose([k * 4e6 for k in keep], [1.5e6, 0.5e6])
    keep = sample_shares([4e6, 1e5, 4e6], [0.4, 0.2, 0.4], max_sample_mb=2.1)  # the small one gives all it has
    assert np.allclose([k * s for k, s in zip(keep, [4e6, 1e5, 4e6])], [1e6, 1e5, 1e6])


def test_over_repetition_is_an_error_line_before_ranks_start(tmp_path, data_run):
    run_dir = fresh_run(data_run, tmp_path / "run")
    proc = run_in_process(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "train.max_steps=20000",
                          "data.default_num_documents=2000", "data.val_fraction=0.05")
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "more than data.max_repetitions=12 times (prose" in lines[0] and "raise data.max_repetitions" in lines[0]
