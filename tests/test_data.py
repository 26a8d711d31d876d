"""pipeline.data.stream: token stream over shards, windows, seeded order, data parallelism, resumption, bad input.

Synthetic shards hold token t at stream position t (ids < 65000), so a window's first input token
divided by seq_len is its sample index, and any misplaced token shows up.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.indexed import IndexedDatasetWriter
from pipeline.data.stream import PretrainLoader, eval_batches, open_split
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file

VOCAB = 65000
SHARD_SIZES = (300, 257, 5, 420)  # tokens per train shard: seq_len 16 windows cross every boundary
SEQ = 16


def write_split(root: Path, split: str, shard_tokens: list[np.ndarray], dtype=np.uint16) -> list[dict]:
    (root / split).mkdir(parents=True, exist_ok=True)
    infos = []
    for k, tokens in enumerate(shard_tokens):
        with IndexedDatasetWriter(root / split / f"{k:05d}", dtype) as w:
            for doc in np.array_split(tokens, 3):  # a few documents per shard
                w.add_document(doc)
            infos.append(asdict(w.finalize()))
    return infos


def make_run(root: Path, train: list[np.ndarray], val: list[np.ndarray] | None = None,
             vocab: int = VOCAB) -> tuple[Path, Path]:
    """shards/ with a manifest shaped like shard.py's, and a stand-in tokenizer file."""
    tokenizer = root / "tokenizer.model"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"stand-in tokenizer " + root.name.encode())
    shards = root / "shards"
    splits = {}
    for split, parts in (("train", train), ("val", val if val is not None else [np.arange(200)])):
        infos = write_split(shards, split, parts)
        splits[split] = {"documents": sum(i["num_documents"] for i in infos),
                         "tokens": sum(i["num_tokens"] for i in infos), "shards": infos}
    manifest = {"format": "MMIDIDX", "format_version": 1, "tokenizer_sha256": sha256_file(tokenizer),
                "vocab_size": vocab, "dtype": "uint16", "eos_id": 0, "bos_id": 1, "pad_id": -1,
                "val_fraction": 0.1, "seed": 1234, "splits": splits}
    (shards / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return shards, tokenizer


def positions_run(root: Path, sizes=SHARD_SIZES) -> tuple[Path, Path]:
    bounds = np.cumsum((0,) + tuple(sizes))
    return make_run(root, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])


@pytest.fixture
def run(tmp_path) -> tuple[Path, Path]:
    return positions_run(tmp_path / "run")


@pytest.fixture
def stream(run):
    return open_split(run[0], "train", run[1])


def sample_ids(batches, seq_len=SEQ) -> list[int]:
    """Sample index of every window in a list of (inputs, labels), after checking each is a true window."""
    ids = []
    for inputs, labels in batches:
        assert inputs.dtype == labels.dtype == torch.int64 and inputs.is_contiguous() and labels.is_contiguous()
        assert inputs.shape == labels.shape and inputs.shape[1] == seq_len
        first = inputs[:, :1]
        assert torch.equal(inputs, first + torch.arange(seq_len)) and torch.equal(labels, inputs + 1)
        assert torch.all(first % seq_len == 0)
        ids += (first[:, 0] // seq_len).tolist()
    return ids


def loader(stream, mbs=2, gbs=8, rank=0, world=1, seed=7, seq_len=SEQ) -> PretrainLoader:
    return PretrainLoader(stream, seq_len, mbs, gbs, rank, world, seed)


def take(ld: PretrainLoader, steps: int) -> list[list[int]]:
    return [sample_ids(ld.next_global_batch(), ld.seq_len) for _ in range(steps)]


# --- stream and windows -----------------------------------------------------------------------------------------

def test_stream_is_the_concatenation_and_windows_span_shards(stream):
    total = sum(SHARD_SIZES)
    assert stream.num_tokens == total and stream.vocab_size == VOCAB and stream.eos_id == 0
    assert np.array_equal(stream.read(0, total), np.arange(total))
    assert np.array_equal(stream.read(295, 270), np.arange(295, 565))  # crosses three files, one of 5 tokens
    with pytest.raises(IndexError):
        stream.read(total - 3, 4)
    n = (total - 1) // SEQ
    ev = eval_batches(stream, SEQ, batch_size=1)  # every window, in order
    assert len(ev) == n
    windows = [torch.cat([x[0], y[0, -1:]]) for x, y in ev]
    bounds = set(np.cumsum(SHARD_SIZES)[:-1].tolist())
    spanning = [i for i in range(n) if any(i * SEQ < b <= i * SEQ + SEQ for b in bounds)]
    assert len(spanning) >= 3
    for i, w in enumerate(windows):
        assert torch.equal(w, torch.arange(i * SEQ, i * SEQ + SEQ + 1))


def test_real_shards_from_the_cli(small_run):
    manifest = json.loads((small_run / "shards" / "manifest.json").read_text())["sources"]["corpus"]
    s = open_split(small_run / "shards", "train", small_run / "tokenizer" / "tokenizer.model")
    assert s.num_tokens == manifest["splits"]["train"]["tokens"]
    tokens = s.read(0, s.num_tokens)
    assert tokens[-1] == s.eos_id and int((tokens == s.eos_id).sum()) == manifest["splits"]["train"]["documents"]
    ld = PretrainLoader(s, 32, 2, 4, 0, 1, seed=0)
    inputs, labels = ld.next_global_batch()[0]
    assert inputs.shape == (2, 32) and torch.equal(inputs[:, 1:], labels[:, :-1])
    assert int(inputs.max()) < s.vocab_size


# --- order ------------------------------------------------------------------------------------------------------

def test_every_sample_once_per_epoch_and_seeded_order(stream):
    n = (stream.num_tokens - 1) // SEQ  # 61: global batches of 8 straddle the epoch boundaries
    assert n % 8
    ld = loader(stream)
    flat = sum(take(ld, 3 * n // 8 + 1), [])
    epochs = [flat[e * n:(e + 1) * n] for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(n))
        assert order == ld.order.permutation(e).tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    assert ld.order.epoch == 3 and ld.order.samples_consumed == len(flat)
    assert sum(take(loader(stream), 20), []) == flat[:160]  # deterministic
    assert sum(take(loader(stream, seed=8), 8), []) != flat[:64]


def test_ranks_get_disjoint_slices_of_the_same_global_batch(stream):
    single = loader(stream, mbs=2, gbs=4)  # 1 rank x mbs 2 x accum 2
    assert single.layout.accumulation == 2
    ranks = [loader(stream, mbs=2, gbs=4, rank=r, world=2) for r in range(2)]  # 2 ranks x mbs 2 x accum 1
    assert ranks[0].layout.accumulation == 1
    for _ in range(40):  # crosses an epoch boundary
        want = sample_ids(single.next_global_batch())
        parts = [sample_ids(ld.next_global_batch()) for ld in ranks]
        assert parts[0] + parts[1] == want
        assert not set(parts[0]) & set(parts[1])
    for mbs, world, gbs in ((1, 4, 4), (2, 2, 8), (1, 3, 12)):  # also with grad_accum > 1 on each rank
        ranks = [loader(stream, mbs=mbs, gbs=gbs, rank=r, world=world) for r in range(world)]
        single = loader(stream, mbs=gbs // 2, gbs=gbs)
        for _ in range(20):
            parts = [sample_ids(ld.next_global_batch()) for ld in ranks]
            assert sum(parts, []) == sample_ids(single.next_global_batch())
            assert [len(part) for part in parts] == [gbs // world] * world


def test_global_batch_must_divide(stream):
    with pytest.raises(PipelineError, match=r"global_batch_size=10 is not a multiple of .* = 2 × 4 = 8"):
        loader(stream, mbs=2, gbs=10, world=4)
    with pytest.raises(PipelineError, match="dp_rank"):
        loader(stream, rank=2, world=2)


# --- resumption -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 7, 15])  # 7 x 8 = 56 of 61: the next batch straddles the epoch boundary
def test_resume_is_exact(stream, run, k):
    uninterrupted = loader(stream)
    take(uninterrupted, k)
    interrupted = loader(stream)
    take(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    assert state["samples_consumed"] == 8 * k and state["epoch"] == 8 * k // 61
    resumed = loader(open_split(run[0], "train", run[1]))  # a fresh process: new stream, new loader
    resumed.load_state_dict(state)
    assert take(resumed, 10) == take(uninterrupted, 10)
    # another data-parallel layout with the same global batch continues the same way
    two = [loader(stream, mbs=4, rank=r, world=2) for r in range(2)]
    again = loader(stream)
    for ld in (*two, again):
        ld.load_state_dict(state)
    for _ in range(10):
        assert take(two[0], 1)[0] + take(two[1], 1)[0] == take(again, 1)[0]


def test_resume_refuses_changed_data_or_shapes(stream, tmp_path):
    ld = loader(stream)
    take(ld, 2)
    state = ld.state_dict()
    other = positions_run(tmp_path / "other", sizes=(300, 257, 6, 419))  # same token count, other files
    with pytest.raises(PipelineError, match="refusing to resume: the shards changed since the checkpoint"):
        loader(open_split(other[0], "train", other[1])).load_state_dict(state)
    with pytest.raises(PipelineError, match="refusing to resume: seq_len is 8"):
        loader(stream, seq_len=8).load_state_dict(state)
    with pytest.raises(PipelineError, match="refusing to resume: global_batch_size is 16"):
        loader(stream, gbs=16).load_state_dict(state)
    with pytest.raises(PipelineError, match="refusing to resume: seed"):
        loader(stream, seed=9).load_state_dict(state)
    with pytest.raises(PipelineError, match="samples_consumed"):
        loader(stream).load_state_dict({**state, "samples_consumed": 12})


# --- bad input --------------------------------------------------------------------------------------------------

def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_missing_manifest(tmp_path, run):
    (run[0] / "manifest.json").unlink()
    with pytest.raises(PipelineError, match=r"manifest\.json does not exist: run stages=\[shard\]"):
        open_split(run[0], "train", run[1])


def test_tokenizer_mismatch(tmp_path, run):
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    with pytest.raises(PipelineError, match=r"shards were written with another tokenizer.*rerun stages=\[shard\]"):
        open_split(run[0], "train", other)


def test_missing_shard_file(run):
    (run[0] / "train" / "00002.bin").unlink()
    with pytest.raises(PipelineError, match=r"00002\.bin .* is missing"):
        open_split(run[0], "train", run[1])


def test_flipped_byte_caught_by_full_verify_only(run):
    flip_byte(run[0] / "train" / "00001.bin", 10)
    with pytest.raises(PipelineError, match=r"00001\.bin: sha256 differs"):
        open_split(run[0], "train", run[1])
    for mode in ("size", "off"):  # neither reads the contents
        assert open_split(run[0], "train", run[1], verify=mode).read(305, 1)[0] == 305 ^ 1
    flip_byte(run[0] / "train" / "00000.idx", 40)  # a size in the index
    with pytest.raises(PipelineError, match=r"00000\.idx: sha256 differs"):
        open_split(run[0], "train", run[1])


def test_truncated_file_caught_by_size_verify_and_by_the_reader(run):
    path = run[0] / "train" / "00003.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(PipelineError, match=r"00003\.bin is 838 bytes but .* says 840"):
        open_split(run[0], "train", run[1], verify="size")
    with pytest.raises(PipelineError, match=r"00003\.bin: size 838 bytes, index expects 840"):
        open_split(run[0], "train", run[1], verify="off")


def test_corrupt_index_format_is_a_pipeline_error(run):
    path = run[0] / "train" / "00000.idx"
    path.write_bytes(b"NOTMMIDX!" + path.read_bytes()[9:])
    with pytest.raises(PipelineError, match="bad magic"):
        open_split(run[0], "train", run[1], verify="off")


def test_token_id_outside_vocab(tmp_path):
    shards, tok = make_run(tmp_path / "r", [np.arange(100), np.array([5, 300, 7])], vocab=300)
    with pytest.raises(PipelineError, match=r"00001\.bin holds token ids in \[5, 300\], outside the vocabulary"):
        open_split(shards, "train", tok)


def test_split_too_small_for_one_window(tmp_path):
    shards, tok = make_run(tmp_path / "r", [np.arange(10), np.arange(6)])
    s = open_split(shards, "train", tok)
    assert PretrainLoader(s, 15, 1, 1, 0, 1, 0).num_samples == 1  # 16 tokens: exactly one window of 16
    with pytest.raises(PipelineError, match="train split has 16 tokens, too few for one window of seq_len"):
        PretrainLoader(s, 16, 1, 1, 0, 1, 0)
    with pytest.raises(PipelineError, match="fewer than one eval batch"):
        eval_batches(open_split(shards, "val", tok), 16, batch_size=32)  # 12 windows


def test_unknown_verify_mode_and_split(run):
    with pytest.raises(PipelineError, match="verify mode 'fast'"):
        open_split(run[0], "train", run[1], verify="fast")
    with pytest.raises(PipelineError, match="no split 'test'"):
        open_split(run[0], "test", run[1])


# --- eval -------------------------------------------------------------------------------------------------------

def test_eval_batches_fixed_and_disjoint(run):
    s = open_split(run[0], "val", run[1])  # 200 tokens: 12 windows of 16 + 1
    one = eval_batches(s, SEQ, batch_size=4, num_batches=2)
    assert len(one) == 2
    first = [sample_ids([b]) for b in one]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7]] and [sample_ids([b]) for b in one] == first  # re-iterable
    # batch_size is per rank: 2 ranks x 2 cover the same windows as 1 rank x 4, disjoint and in order
    ranks = [eval_batches(s, SEQ, batch_size=2, num_batches=2, dp_rank=r, dp_world=2) for r in range(2)]
    per_rank = [[sample_ids([b]) for b in ev] for ev in ranks]
    assert per_rank == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert len(eval_batches(s, SEQ, batch_size=4, num_batches=10)) == 3  # capped to the batches that exist
    assert len(eval_batches(s, SEQ, batch_size=2, num_batches=10, dp_rank=2, dp_world=3)) == 2
    with pytest.raises(PipelineError, match="fewer than one eval batch of 5 × 3 ranks"):
        eval_batches(s, SEQ, batch_size=5, dp_world=3)


def test_optional_split_absent(tmp_path):
    shards, tok = make_run(tmp_path / "r", [np.arange(100)], val=[])
    assert open_split(shards, "val", tok, required=False) is None
    assert open_split(shards, "train", tok, required=False).num_tokens == 100
    with pytest.raises(PipelineError, match="val split has 0 tokens, too few for one window"):
        PretrainLoader(open_split(shards, "val", tok), SEQ, 1, 1, 0, 1, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_pin_memory_without_cuda_is_a_pipeline_error(stream):
    with pytest.raises(PipelineError, match="pin_memory=True needs a CUDA device"):
        PretrainLoader(stream, SEQ, 2, 8, 0, 1, 0, pin_memory=True)
