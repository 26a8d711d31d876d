"""tokenizer.max_sample_mb: the bytes that reach SentencePiece are capped, whatever the documents' length."""
from __future__ import annotations

import pytest
import sentencepiece as spm
from conftest import write_jsonl

from pipeline.config import DataConfig, TokenizerConfig
from pipeline.data.corpus import Corpus
from pipeline.stages.tokenize import train_tokenizer


def sampled_bytes(monkeypatch, tmp_path, docs: list[str], max_sample_mb: float) -> int:
    """Bytes SentencePiece's trainer would have been given (its iterator drained, nothing trained)."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    seen = []

    def fake_train(sentence_iterator, **kwargs):
        seen.append(sum(len(s.encode()) for s in sentence_iterator))
        raise RuntimeError("stop here")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", fake_train)
    corpus = Corpus([path], DataConfig(source="files", paths=[str(path)]))
    with pytest.raises(Exception, match="stop here"):
        train_tokenizer(corpus, TokenizerConfig(max_sample_mb=max_sample_mb), tmp_path / "tok.model", seed=1)
    return seen[0]


def test_long_documents_are_sampled_to_the_byte_cap(monkeypatch, tmp_path):
    line = "the river town baker walked to market with bread and honey\n"
    docs = [line * 2000 for _ in range(20)]  # 20 documents of 120 KB: 300 chunks of about 8 KB
    total = sum(len(d) for d in docs)
    assert sampled_bytes(monkeypatch, tmp_path, docs, 0) == total  # 0: no cap
    capped = sampled_bytes(monkeypatch, tmp_path, docs, total / 4 / 1e6)
    assert 0.15 * total < capped < 0.35 * total  # about a quarter (disk bytes hold a little JSON quoting too)
    one_huge = sampled_bytes(monkeypatch, tmp_path, ["".join(docs)], total / 4 / 1e6)
    assert 0.15 * total < one_huge < 0.35 * total  # chunks are sampled, not documents
