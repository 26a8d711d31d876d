import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from mmidx_reference import independent_read

from pipeline.data.indexed import IndexedDataset, IndexedDatasetWriter, ShardInfo, token_dtype


def random_docs(rng, n, vocab):
    lengths = [0, 1, 0, 1] + list(rng.integers(0, 200, n))
    return [rng.integers(0, vocab, k, dtype=np.int64) for k in lengths]


def write(prefix, dtype, docs, batched):
    with IndexedDatasetWriter(prefix, dtype) as w:
        if batched:  # split into a few add_documents calls, including an empty batch
            for chunk in (docs[:3], [], docs[3:10], docs[10:]):
                flat = np.concatenate(chunk) if chunk else np.zeros(0, np.int64)
                w.add_documents(flat, np.array([len(d) for d in chunk], dtype=np.int64))
        else:
            for d in docs:
                w.add_document(d)
        assert w.num_documents == len(docs)
        assert w.num_tokens == sum(len(d) for d in docs)
        assert w.bin_bytes == w.num_tokens * np.dtype(dtype).itemsize
        return w.finalize()


@pytest.mark.parametrize("vocab", [50_000, 100_000])
@pytest.mark.parametrize("batched", [False, True])
def test_round_trip(tmp_path, vocab, batched):
    rng = np.random.default_rng(vocab + batched)
    docs = random_docs(rng, 40, vocab)
    dtype = token_dtype(vocab)
    prefix = tmp_path / "shard"
    info = write(prefix, dtype, docs, batched)
    assert isinstance(info, ShardInfo)
    assert (info.prefix, info.num_documents) == ("shard", len(docs))
    assert info.num_tokens == sum(len(d) for d in docs)

    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == len(docs) and ds.num_tokens == info.num_tokens
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64 and ds.doc_idx.dtype == np.int64
    for i, d in enumerate(docs):
        assert ds[i].dtype == dtype
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    assert np.shares_memory(ds[5], ds.tokens)  # zero copy
    with pytest.raises(IndexError):
        ds[len(docs)]

    got_dtype, got_docs = independent_read(prefix)
    assert got_dtype == dtype
    assert got_docs == [d.tolist() for d in docs]


def test_both_paths_produce_identical_files(tmp_path):
    docs = random_docs(np.random.default_rng(0), 30, 1000)
    a, b = write(tmp_path / "a", np.uint16, docs, False), write(tmp_path / "b", np.uint16, docs, True)
    assert (a.bin_sha256, a.idx_sha256) == (b.bin_sha256, b.idx_sha256)


def test_sha256_and_sizes_match_disk(tmp_path):
    docs = random_docs(np.random.default_rng(1), 20, 100_000)
    info = write(tmp_path / "s", np.int32, docs, True)
    bin_bytes, idx_bytes = (tmp_path / "s.bin").read_bytes(), (tmp_path / "s.idx").read_bytes()
    assert info.bin_sha256 == hashlib.sha256(bin_bytes).hexdigest()
    assert info.idx_sha256 == hashlib.sha256(idx_bytes).hexdigest()
    assert (info.bin_bytes, info.idx_bytes) == (len(bin_bytes), len(idx_bytes))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]  # no tmp left behind


def test_empty_dataset(tmp_path):
    info = write(tmp_path / "e", np.uint16, [], True)
    assert (info.num_documents, info.num_tokens, info.bin_bytes) == (0, 0, 0)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens.size == 0
    assert ds.doc_idx.tolist() == [0]
    assert independent_read(tmp_path / "e")[1] == []


def test_only_empty_documents(tmp_path):
    write(tmp_path / "z", np.uint16, [np.zeros(0, np.int64)] * 3, False)
    ds = IndexedDataset(tmp_path / "z")
    assert len(ds) == 3 and all(ds[i].size == 0 for i in range(3))


def test_abort_and_exception_leave_nothing(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    w.add_document(np.arange(10))
    w.abort()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("boom")
    with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:  # left without finalize(): not published
        w.add_document(np.arange(10))
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_write_leaves_no_idx(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "c", np.uint16)
    w.add_documents(np.arange(100), np.array([50, 50]))
    del w  # "killed": never finalized
    names = {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / "c.idx").exists() and not (tmp_path / "c.bin").exists()
    assert names <= {"c.bin.tmp", "c.idx.tmp"}


def test_overflow_and_bad_input(tmp_path):
    with IndexedDatasetWriter(tmp_path / "o", np.uint16) as w:
        with pytest.raises(ValueError):
            w.add_document(np.array([1, 70000]))
        with pytest.raises(ValueError):
            w.add_document(np.array([-1]))
        with pytest.raises(ValueError):
            w.add_documents(np.arange(5), np.array([2, 2]))  # lengths don't sum to len(tokens)
        with pytest.raises(ValueError):
            w.add_documents(np.arange(5), np.array([6, -1]))
        assert w.num_documents == 0 and w.bin_bytes == 0  # rejected input wrote nothing
        w.add_document(np.array([65535], dtype=np.int64))  # the max id fits
        w.finalize()
    assert IndexedDataset(tmp_path / "o")[0].tolist() == [65535]


def test_token_dtype_thresholds():
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(32000) == np.uint16 and token_dtype(128_256) == np.int32


@pytest.fixture
def shard(tmp_path):
    prefix = tmp_path / "shard"
    write(prefix, np.uint16, random_docs(np.random.default_rng(2), 10, 1000), True)
    return prefix


def corrupt(path: Path, fn):
    path.write_bytes(fn(path.read_bytes()))


@pytest.mark.parametrize("target,fn", [
    ("idx", lambda b: b[:-4]),                                  # truncated doc_idx
    ("idx", lambda b: b[:20]),                                  # truncated header
    ("idx", lambda b: b + b"\x00" * 8),                         # trailing garbage
    ("idx", lambda b: b"XXIDIDX\x00\x00" + b[9:]),              # bad magic
    ("idx", lambda b: b[:9] + struct.pack("<Q", 2) + b[17:]),   # bad version
    ("idx", lambda b: b[:17] + b"\x09" + b[18:]),               # unknown dtype code
    ("bin", lambda b: b[:-2]),                                  # truncated bin
    ("bin", lambda b: b + b"\x00\x00"),                         # bin longer than the index says
])
def test_reader_rejects_corruption(shard, target, fn):
    path = Path(f"{shard}.{target}")
    corrupt(path, fn)
    with pytest.raises(ValueError, match=path.name):
        IndexedDataset(shard)
