"""An MMIDIDX reader written from the format description alone (struct + read), to check our writer
against the format rather than against itself."""
import struct
from pathlib import Path

import numpy as np

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def independent_read(prefix: Path) -> tuple[np.dtype, list[list[int]]]:
    """Parse .idx/.bin from the format description with struct + open().read() only, checking invariants."""
    idx = open(f"{prefix}.idx", "rb").read()
    binary = open(f"{prefix}.bin", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", idx, 17)
    fmt, itemsize = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8),
                     6: ("d", 8), 7: ("f", 4), 8: ("H", 2)}[code]
    n, m = struct.unpack_from("<QQ", idx, 18)
    off = 34
    sizes = struct.unpack_from(f"<{n}i", idx, off); off += 4 * n
    pointers = struct.unpack_from(f"<{n}q", idx, off); off += 8 * n
    doc_idx = struct.unpack_from(f"<{m}q", idx, off); off += 8 * m
    assert off == len(idx), "trailing bytes in .idx"
    assert list(doc_idx) == list(range(n + 1))
    expected_ptr = 0
    docs = []
    for size, ptr in zip(sizes, pointers):
        assert ptr == expected_ptr
        docs.append(list(struct.unpack_from(f"<{size}{fmt}", binary, ptr)))
        expected_ptr += size * itemsize
    assert expected_ptr == len(binary)
    return np.dtype(DTYPES[code]), docs
