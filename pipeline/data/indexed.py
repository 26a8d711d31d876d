"""Megatron / GPT-NeoX MMapIndexedDataset (.bin + .idx, "MMIDIDX" version 1): writer and reader.

<prefix>.bin  all sequences' tokens back to back, raw little-endian.
<prefix>.idx  magic b"MMIDIDX\\x00\\x00", u64 version=1, u8 dtype code, u64 num sequences n,
              u64 len(doc_idx) m, int32[n] sizes, int64[n] pointers (byte offsets into .bin), int64[m] doc_idx.
We write one sequence per document, so doc_idx = [0, 1, ..., n].
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, num sequences, len(doc_idx): 34 bytes
# explicit '<' so files are little-endian whatever the host
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"),
    5: np.dtype("<i8"), 6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2"),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies that fit (Megatron's 65500 cut-off), else int32."""
    return DTYPE_CODES[8] if vocab_size < 65500 else DTYPE_CODES[4]


@dataclass(frozen=True)
class ShardInfo:
    prefix: str  # basename of the prefix, e.g. "shard_00000"
    num_documents: int
    num_tokens: int
    bin_sha256: str
    idx_sha256: str
    bin_bytes: int
    idx_bytes: int


class IndexedDatasetWriter:
    """Streams documents to <prefix>.bin.tmp; finalize() writes the .idx and atomically publishes both."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {dtype}; expected one of {list(DTYPE_CODES.values())}")
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        self.bin_tmp, self.idx_tmp = Path(f"{self.bin_path}.tmp"), Path(f"{self.idx_path}.tmp")
        self._bin = open(self.bin_tmp, "wb", buffering=1 << 20)  # buffered: many small add_document calls
        self._bin_hash = hashlib.sha256()  # hashed as written, so finalize never rereads the .bin
        self._sizes: list[np.ndarray] = []  # int32 chunks; the only per-document state kept in memory
        self._num_documents = self._num_tokens = self._bin_bytes = 0
        self._closed = False

    @property
    def num_tokens(self) -> int: return self._num_tokens
    @property
    def num_documents(self) -> int: return self._num_documents
    @property
    def bin_bytes(self) -> int: return self._bin_bytes  # bytes written to the .bin so far

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents given as one flat token array plus each document's length."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        if tokens.ndim != 1 or lengths.ndim != 1:
            raise ValueError(f"tokens and lengths must be 1-D, got shapes {tokens.shape} and {lengths.shape}")
        if lengths.size and (not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 0
                             or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("lengths must be integers in [0, 2**31)")
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._check_fits(tokens)
        data = np.ascontiguousarray(tokens, dtype=self.dtype)  # no copy when already the right dtype
        buf = memoryview(data).cast("B")
        self._bin.write(buf)
        self._bin_hash.update(buf)
        self._sizes.append(lengths.astype(np.int32))
        self._num_documents += lengths.size
        self._num_tokens += tokens.size
        self._bin_bytes += buf.nbytes

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (may be empty)."""
        tokens = np.asarray(tokens).reshape(-1)
        self.add_documents(tokens, np.array([tokens.size], dtype=np.int64))

    def _check_fits(self, tokens: np.ndarray) -> None:
        # a silent wrap-around (70000 -> 4464 in uint16) would corrupt the data without any error
        if not np.issubdtype(self.dtype, np.integer) or np.can_cast(tokens.dtype, self.dtype, "safe"):
            return
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token array of dtype {tokens.dtype} cannot be stored as {self.dtype}")
        info = np.iinfo(self.dtype)
        if tokens.size and (int(tokens.min()) < info.min or int(tokens.max()) > info.max):
            raise ValueError(f"token ids [{int(tokens.min())}, {int(tokens.max())}] do not fit in {self.dtype}"
                             f" (range [{info.min}, {info.max}])")

    def finalize(self) -> ShardInfo:
        """Write the .idx, fsync, rename .bin then .idx into place (an .idx on disk implies a complete .bin)."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")
        num = self._num_documents
        header = HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], num, num + 1)
        idx_hash, idx_bytes = hashlib.sha256(), 0
        with open(self.idx_tmp, "wb") as f:
            # written chunk by chunk: memory stays flat however many documents a shard holds
            for part in self._idx_parts(header):
                f.write(part)
                idx_hash.update(part)
                idx_bytes += len(part)
            f.flush()
            os.fsync(f.fileno())
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self.bin_tmp, self.bin_path)  # .bin first, .idx last: the .idx is the commit marker
        os.replace(self.idx_tmp, self.idx_path)
        _fsync_dir(self.idx_path.parent)  # make the renames themselves durable
        self._closed = True
        return ShardInfo(self.prefix.name, self._num_documents, self._num_tokens,
                         self._bin_hash.hexdigest(), idx_hash.hexdigest(), self._bin_bytes, idx_bytes)

    def _idx_parts(self, header: bytes) -> Iterator[bytes]:
        """The .idx in pieces: header, sizes, pointers (running byte offsets), doc_idx."""
        yield header
        for sizes in self._sizes:
            yield sizes.astype("<i4").tobytes()
        offset = 0
        for sizes in self._sizes:
            if len(sizes):
                ends = offset + np.cumsum(sizes, dtype=np.int64) * self.dtype.itemsize
                yield np.concatenate(([offset], ends[:-1])).astype("<i8").tobytes()
                offset = int(ends[-1])
        step = 1 << 20
        for start in range(0, self._num_documents + 1, step):
            yield np.arange(start, min(start + step, self._num_documents + 1), dtype="<i8").tobytes()

    def abort(self) -> None:
        """Drop everything written so far (removes the temp files)."""
        if not self._bin.closed:
            try:
                self._bin.close()
            except OSError:  # flushing the buffer failed (a full disk): the file is closed all the same
                pass
        self.bin_tmp.unlink(missing_ok=True)
        self.idx_tmp.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # leaving the block without finalize() (exception or not) must never publish a partial shard
        if not self._closed:
            self.abort()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexedDataset:
    """Read-only, memory-mapped view of <prefix>.bin/.idx; items are zero-copy views."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        idx_size = idx_path.stat().st_size
        if idx_size < HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes, header alone is {HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n, m = HEADER.unpack(f.read(HEADER.size))
            if magic != MAGIC:
                raise ValueError(f"{idx_path}: bad magic {magic!r}, not an MMIDIDX index")
            if version != VERSION:
                raise ValueError(f"{idx_path}: unsupported version {version} (expected {VERSION})")
            if code not in DTYPE_CODES:
                raise ValueError(f"{idx_path}: unknown dtype code {code}")
            expected = HEADER.size + n * 4 + n * 8 + m * 8
            if idx_size != expected:
                raise ValueError(f"{idx_path}: size {idx_size} bytes, expected {expected} for {n} sequences "
                                 f"and {m} doc_idx entries (truncated or corrupt)")
            self._idx_mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.dtype = DTYPE_CODES[code]
        self.sizes = np.frombuffer(self._idx_mmap, "<i4", n, HEADER.size)
        self.pointers = np.frombuffer(self._idx_mmap, "<i8", n, HEADER.size + n * 4)
        self.doc_idx = np.frombuffer(self._idx_mmap, "<i8", m, HEADER.size + n * 12)

        bin_size = bin_path.stat().st_size
        item = self.dtype.itemsize
        ends = self.pointers + self.sizes.astype(np.int64) * item
        expected = int(ends[-1]) if n else 0
        if bin_size != expected:
            raise ValueError(f"{bin_path}: size {bin_size} bytes, index expects {expected} (truncated or mismatched)")
        if n and (self.sizes.min() < 0 or self.pointers.min() < 0 or ends.max() > bin_size
                  or np.any(self.pointers % item)):
            raise ValueError(f"{idx_path}: sizes/pointers are inconsistent with {bin_path}")
        if bin_size == 0:  # mmap (and np.memmap) refuse empty files
            self._bin_mmap, self._tokens = None, np.zeros(0, self.dtype)
        else:
            with open(bin_path, "rb") as f:
                self._bin_mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(self._bin_mmap, self.dtype)

    def __len__(self) -> int:
        return self.sizes.size

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[i])]

    @property
    def tokens(self) -> np.ndarray:
        """The whole .bin as one read-only 1-D array (memory-mapped, zero copy)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return self._tokens.size
