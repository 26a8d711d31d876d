"""The tokenize stage: lossless SentencePiece, reserved special tokens, reuse of a given model."""
import hashlib

import pytest
import sentencepiece as spm
from conftest import ADVERSARIAL, mixed_documents, run_in_process, write_jsonl

from pipeline.data.indexed import IndexedDataset
from pipeline.data.vocab import CHAT_TOKENS
from pipeline.stages.tokenize import training_chunks


@pytest.fixture(scope="module")
def sp(small_run):
    return spm.SentencePieceProcessor(model_file=str(small_run / "tokenizer" / "tokenizer.model"))


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_is_lossless(sp, text):
    assert sp.decode(sp.encode(text)) == text


def test_round_trip_of_random_unicode(sp):
    import random

    rng = random.Random(0)
    for _ in range(50):
        # any code point outside the surrogate range, U+2581 (SentencePiece's own space marker) excluded
        chars = [chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                 for _ in range(rng.randint(1, 60))]
        text = "".join(c for c in chars if c != "\u2581")
        assert sp.decode(sp.encode(text)) == text


def test_special_tokens_are_reserved(sp):
    assert [sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()] == [0, 1, 2, 3]
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    for token in CHAT_TOKENS:
        ids = sp.encode(token)
        assert len(ids) == 1 and sp.id_to_piece(ids[0]) == token


def test_digits_are_split(sp):
    pieces = sp.encode("1234567890", out_type=str)
    assert all(len(p.strip("▁")) <= 1 or p.startswith("<0x") for p in pieces)


def test_training_chunks_keep_newlines_and_cut_long_lines():
    docs = ["a\nb\n" * 10, "x" * 100]
    chunks = list(training_chunks(docs, max_bytes=8))
    assert all(len(c.encode()) <= 8 for c in chunks)
    assert "".join(chunks) == "".join(docs)
    assert "a\nb\na\nb\n" in chunks  # whole lines, newlines kept


def test_unigram_model_trains(tmp_path, small_corpus):
    proc = run_in_process(f"run_dir={tmp_path}", "data=files", f"data.paths=[{small_corpus}]", "stages=[tokenize]",
                          "tokenizer.model_type=unigram", "tokenizer.vocab_size=350")
    assert proc.returncode == 0, proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer" / "tokenizer.model"))
    assert sp.get_piece_size() == 350
    for text in ADVERSARIAL:
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_path_reuses_the_model(tmp_path, small_run, small_corpus):
    given = small_run / "tokenizer" / "tokenizer.model"
    proc = run_in_process(f"run_dir={tmp_path}", "data=files", f"data.paths=[{small_corpus}]",
                          "stages=[tokenize,shard]", f"tokenizer.path={given}",
                          "tokenizer.vocab_size=999999")  # vocab_size unused when reusing
    assert proc.returncode == 0, proc.stderr
    copied = tmp_path / "tokenizer" / "tokenizer.model"
    assert hashlib.sha256(copied.read_bytes()).digest() == hashlib.sha256(given.read_bytes()).digest()
    assert "reading" not in proc.stderr  # no pass over the corpus for training


@pytest.mark.slow
def test_long_single_line_trains_and_encodes(tmp_path):
    line = ("word" + "x" * 7 + " ") * (10 * 1024 * 1024 // 12)  # one 10 MB line
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": line}] + [{"text": d} for d in mixed_documents(200)])
    proc = run_in_process(f"run_dir={tmp_path / 'run'}", "data=files", f"data.paths=[{corpus}]",
                          "stages=[tokenize,shard]", "tokenizer.vocab_size=400", "data.val_fraction=0")
    assert proc.returncode == 0, proc.stderr
    first = IndexedDataset(tmp_path / "run" / "shards" / "train" / "00000")[0]
    assert first[-1] == 2 and len(first) > len(line) // 12  # the whole line, then EOS
