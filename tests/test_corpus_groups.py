"""Many files read as one `datasets` stream (corpus._runs_of_clean_files): the same documents, stats,
warnings and errors as reading each file on its own."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.corpus import Corpus, _runs_of_clean_files
from pipeline.errors import PipelineError


def many_files(folder: Path) -> list[Path]:
    folder.mkdir()
    files = {
        "a0.txt": "first file\n\nsecond paragraph\n", "a1.txt": "", "a2.txt": " \n",
        "a3.txt": b"bad \xff byte\x00 here", "a4.txt": "tail\n\n\nmore",
        "b0.jsonl": "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["x", "", "yz"])),
        "b1.jsonl": json.dumps({"text": "no id"}) + "\n", "c0.txt": "after the json",
    }
    for name, body in files.items():
        path = folder / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return sorted(folder.iterdir())


@pytest.mark.parametrize("paragraphs", [False, True])
def test_one_stream_reads_what_each_file_alone_reads(tmp_path, caplog, paragraphs):
    paths = many_files(tmp_path / "docs")
    data = DataConfig(source="files", split_on_blank_lines=paragraphs)
    runs = [(builder, [p.name for p in group]) for builder, group in _runs_of_clean_files(paths)]
    assert runs == [("text", ["a0.txt", "a1.txt", "a2.txt"]), ("text", ["a3.txt"]), ("text", ["a4.txt"]),
                    ("json", ["b0.jsonl", "b1.jsonl"]), ("text", ["c0.txt"])]
    with caplog.at_level(logging.WARNING):
        together = Corpus(paths, data)
        texts = list(together.texts())
    warnings = [r.getMessage() for r in caplog.records]
    alone = [Corpus([p], data) for p in paths]
    assert texts == [t for corpus in alone for t in corpus.texts()]
    total = {key: sum(c.stats.as_dict()[key] for c in alone) for key in together.stats.as_dict()}
    assert together.stats.as_dict() == total and total["replaced_chars"] == 2
    assert warnings == [f"{paths[3]}: 1 invalid UTF-8 sequences replaced by U+FFFD"]


def test_an_error_names_its_file_among_many(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    (folder / "2.jsonl").write_text(json.dumps({"body": "no text"}) + "\n")
    corpus = Corpus(sorted(folder.iterdir()), DataConfig(source="files"))
    seen = []
    with pytest.raises(PipelineError, match=r"2\.jsonl: no field 'text' \(columns: body\)"):
        for text in corpus.texts():
            seen.append(text)
    assert seen == ["doc 0", "doc 1"]  # each document once, up to the bad file


@pytest.mark.parametrize("num_parts, batch_bytes", [(1, 1), (1, 50), (3, 40), (2, 10_000)])
def test_batches_cut_at_the_document_that_fills_them(tmp_path, num_parts, batch_bytes):
    """Corpus.batches over lists of records: each job's every num_parts-th document, in order, with its corpus
    index; a batch ends with the document that brings it to batch_bytes, not before."""
    path = tmp_path / "docs.jsonl"
    texts = [f"document {i} " + "x" * (i * 7 % 23) for i in range(2500)]  # more than one reader batch (1024)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for part in range(num_parts):
        batches = list(Corpus([path], DataConfig(source="files")).batches(batch_bytes, num_parts, part))
        assert [i for b in batches for i in b.indices] == list(range(part, len(texts), num_parts))
        assert [t for b in batches for t in b.texts] == texts[part::num_parts]
        for batch in batches:
            assert batch.num_bytes == sum(map(len, batch.texts))
        for batch in batches[:-1]:
            assert batch.num_bytes >= batch_bytes > batch.num_bytes - len(batch.texts[-1])


def test_flatten_with_eos():
    import numpy as np

    from pipeline.stages.shard import flatten_with_eos

    flat, lengths = flatten_with_eos([np.array([5, 6], np.int32), np.array([], np.int32), np.array([7], np.int32)],
                                     eos=2, dtype=np.dtype(np.uint16))
    assert flat.dtype == np.uint16 and flat.tolist() == [5, 6, 2, 2, 7, 2] and lengths.tolist() == [3, 1, 2]
