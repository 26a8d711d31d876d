"""Tests for the built-in default corpus (pipeline/data/default_corpus.py)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import default_corpus as dc

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = 800  # documents: enough for file-handling tests, fast to write
FILE_NAMES = ("corpus.jsonl", "instructions_train.jsonl", "instructions_eval.jsonl", "prose.jsonl", "records.jsonl")


def sha256s(directory: Path) -> dict[str, str]:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in FILE_NAMES}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mentions(text: str, phrase: str) -> bool:
    # Word boundaries, so "red" does not match inside "covered" and "Alva Mor" not inside "Alva Morrin".
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


@pytest.fixture(scope="module")
def default_out(tmp_path_factory) -> tuple[Path, dc.DefaultCorpusInfo]:
    out = tmp_path_factory.mktemp("default")
    return out, dc.write_default_corpus(out)


@pytest.fixture(scope="module")
def default_docs(default_out) -> list[str]:
    return [row["text"] for row in read_jsonl(default_out[1].corpus_path)]


@pytest.mark.slow
def test_same_seed_is_byte_identical_across_processes(tmp_path, default_out):
    out, _ = default_out
    again = tmp_path / "again"
    dc.write_default_corpus(again)
    assert sha256s(again) == sha256s(out)
    # A fresh interpreter with a different str-hash salt must produce the same bytes.
    other = tmp_path / "subprocess"
    code = f"from pipeline.data.default_corpus import write_default_corpus as w; w({str(other)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)
    assert sha256s(other) == sha256s(out)


def test_different_seed_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    dc.write_default_corpus(a, seed=1, num_documents=SMALL)
    dc.write_default_corpus(b, seed=2, num_documents=SMALL)
    for name, digest in sha256s(a).items():
        assert sha256s(b)[name] != digest, name


def test_default_sizes(default_out, default_docs):
    out, info = default_out
    assert info.num_documents == dc.DEFAULT_NUM_DOCUMENTS == len(default_docs)
    assert 3_000_000 <= info.corpus_bytes <= 6_000_000
    assert info.corpus_bytes == info.corpus_path.stat().st_size
    train, evaluation = read_jsonl(info.instructions_train_path), read_jsonl(info.instructions_eval_path)
    assert (len(train), len(evaluation)) == (info.num_train_instructions, info.num_eval_instructions)
    assert 2000 <= len(train) <= 12_000 and 200 <= len(evaluation) <= 1500
    for row in train + evaluation:
        assert set(row) == {"prompt", "response", "task"} and row["task"] in ("recall", "reading")
        assert row["prompt"].strip() and row["response"].strip()
        assert len(row["response"].split()) <= 2  # a word, a full name or a number
    recorded = json.loads((out / "info.json").read_text())
    assert recorded["generator_version"] == dc.GENERATOR_VERSION
    assert {n: f["sha256"] for n, f in recorded["files"].items()} == sha256s(out)


def test_documents_have_varied_text(default_docs):
    assert all(doc.strip() for doc in default_docs)
    corpus = "".join(default_docs)
    assert re.search(r"\d{4}", corpus)
    assert "\n" in corpus and "\t" in corpus and "\n    " in corpus
    assert len(set(default_docs)) > 0.9 * len(default_docs)  # not one template repeated verbatim


def test_eval_answers_are_taught_by_the_corpus(default_out, default_docs):
    _, info = default_out
    world = dc.generate_world(1234)
    held_out = [e.name for e in (*world.people, *world.towns) if e.held_out]
    assert held_out and len(held_out) < len(world.people) // 2
    docs_about = {name: [d for d in default_docs if name in d and mentions(d, name)] for name in held_out}
    for row in read_jsonl(info.instructions_eval_path):
        question = row["prompt"].splitlines()[-1]  # a reading prompt starts with its passage
        entity = [name for name in held_out if mentions(question, name)]
        assert len(entity) == 1, row
        together = sum(1 for doc in docs_about[entity[0]] if mentions(doc, row["response"]))
        assert together >= 2, (row, together)


def test_eval_entities_never_in_train_prompts(default_out):
    _, info = default_out
    world = dc.generate_world(1234)
    held_out = [e.name for e in (*world.people, *world.towns) if e.held_out]
    train_prompts = "\n".join(row["prompt"] for row in read_jsonl(info.instructions_train_path))
    assert not [name for name in held_out if mentions(train_prompts, name)]
    eval_prompts = {row["prompt"] for row in read_jsonl(info.instructions_eval_path)}
    assert not eval_prompts & set(train_prompts.splitlines())


def test_api_functions_are_deterministic():
    world = dc.generate_world(7)
    assert world == dc.generate_world(7) and world != dc.generate_world(8)
    assert list(dc.iter_documents(world, 7, 50)) == list(dc.iter_documents(world, 7, 50))
    assert dc.instructions(world, 7) == dc.instructions(world, 7)
    assert len({p.name for p in world.people}) == len(world.people)


def test_reuse_skips_rewrite_and_changed_args_regenerate(tmp_path):
    first = dc.write_default_corpus(tmp_path, num_documents=SMALL)
    mtimes = {n: (tmp_path / n).stat().st_mtime_ns for n in (*FILE_NAMES, "info.json")}
    assert dc.write_default_corpus(tmp_path, num_documents=SMALL) == first
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in mtimes} == mtimes
    bigger = dc.write_default_corpus(tmp_path, num_documents=SMALL + 100)
    assert bigger.num_documents == SMALL + 100 > first.num_documents
    assert len(read_jsonl(bigger.corpus_path)) == SMALL + 100
    assert json.loads((tmp_path / "info.json").read_text())["num_documents"] == SMALL + 100


def test_partial_write_is_regenerated(tmp_path):
    reference = tmp_path / "reference"
    dc.write_default_corpus(reference, num_documents=SMALL)
    expected = sha256s(reference)

    # Crash before info.json was written: a truncated corpus and a leftover temp file.
    crashed = tmp_path / "crashed"
    dc.write_default_corpus(crashed, num_documents=SMALL)
    (crashed / "info.json").unlink()
    (crashed / "corpus.jsonl").write_text('{"text": "half a doc')
    (crashed / ".corpus.jsonl.tmp.99999").write_text("garbage")
    dc.write_default_corpus(crashed, num_documents=SMALL)
    assert sha256s(crashed) == expected
    assert not list(crashed.glob(".*.tmp.*"))

    # info.json present but a data file lost or truncated: sizes no longer match.
    (crashed / "instructions_eval.jsonl").unlink()
    dc.write_default_corpus(crashed, num_documents=SMALL)
    assert sha256s(crashed) == expected
    with open(crashed / "corpus.jsonl", "ab") as fh:
        fh.write(b"\n")
    dc.write_default_corpus(crashed, num_documents=SMALL)
    assert sha256s(crashed) == expected


def test_the_sources_split_the_corpus_by_kind(tmp_path):
    """The built-in mixture: every document of corpus.jsonl in exactly one source's file, in corpus order."""
    dc.write_default_corpus(tmp_path, num_documents=SMALL)
    corpus = [r["text"] for r in read_jsonl(tmp_path / "corpus.jsonl")]
    by_source = {name: [r["text"] for r in read_jsonl(tmp_path / dc.source_file(name))] for name in dc.SOURCES}
    assert sorted(corpus) == sorted(by_source["prose"] + by_source["records"])
    world = dc.generate_world(1234)
    assert [d for s, d in dc.iter_sourced_documents(world, 1234, SMALL) if s == "records"] == by_source["records"]
    assert all(not doc.startswith(("[person]", "# person record")) for doc in by_source["prose"])
    assert 0.1 < len(by_source["records"]) / len(corpus) < 0.4
