"""Sources given as existing MMIDIDX shards (`data.sources.<name>.shards`, written by Megatron, GPT-NeoX or
another run of ours): found, checked against the tokenizer's vocabulary and referenced in place.

`shards: DIR_OR_PREFIX`: a prefix (PREFIX.bin + PREFIX.idx, all train); a folder with train/ (and val/)
holding .bin/.idx pairs; or a folder of pairs (all train). Every document must end with </s> (Megatron's
--append-eod): missing_eos=refuse stops, missing_eos=append writes a copy with it into the run's shards.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import SourceConfig
from ..errors import PipelineError
from ..fsutil import sha256_file
from .indexed import IndexedDataset, IndexedDatasetWriter, ShardInfo
from .stream import _scan_bin

log = logging.getLogger(__name__)


def shard_prefixes(name: str, source: SourceConfig) -> dict[str, list[Path]]:
    """split -> the sorted .bin/.idx prefixes of a shards source."""
    root = Path(source.shards).expanduser()
    key = f"data.sources.{name}.shards={source.shards}"
    if Path(f"{root}.idx").is_file():
        return {"train": [root.resolve()]}
    if not root.is_dir():
        raise PipelineError(f"{key}: neither a folder nor the prefix of a .bin/.idx pair")

    def pairs(folder: Path) -> list[Path]:
        return sorted(p.with_suffix("").resolve() for p in folder.glob("*.idx"))

    found = {split: pairs(root / split) for split in ("train", "val") if (root / split).is_dir()} \
        if (root / "train").is_dir() else {"train": pairs(root)}
    if not found.get("train"):
        raise PipelineError(f"{key}: no .bin/.idx pair found (looked in {root / 'train'} and {root})")
    return found


def shards_identity(name: str, source: SourceConfig) -> list[list]:
    """What the shard stage's output depends on, without reading the files (path, size, mtime)."""
    out = []
    for split, prefixes in shard_prefixes(name, source).items():
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                path = Path(f"{prefix}{suffix}")
                stat = path.stat() if path.is_file() else None
                out.append([split, str(path), stat and stat.st_size, stat and stat.st_mtime_ns])
    return out


def reference_shards(name: str, source: SourceConfig, vocab_size: int, eos_id: int, out_dir: Path) -> dict:
    """The manifest body of a shards source, after checking every file. Documents without </s> and
    missing_eos=append: the source is copied, with </s> after every document, into `out_dir`/{split}/."""
    opened = {split: [(p, _open(name, p)) for p in prefixes] for split, prefixes in shard_prefixes(name, source).items()}
    dtypes = sorted({ds.dtype.name for pairs in opened.values() for _, ds in pairs})
    if len(dtypes) > 1:
        raise PipelineError(f"data.sources.{name}: shards of several dtypes {dtypes}: write them with one")
    bad = [(p, m) for pairs in opened.values() for p, ds in pairs if (m := _check(name, p, ds, vocab_size, eos_id))]
    if bad and source.missing_eos == "refuse":
        raise missing_eos_error(name, *bad[0])
    splits = {}
    for split, pairs in opened.items():
        infos = [asdict(_with_eos(ds, out_dir / split / p.name, eos_id)) if bad else _info(p, ds) for p, ds in pairs]
        splits[split] = {"documents": sum(i["num_documents"] for i in infos),
                         "tokens": sum(i["num_tokens"] for i in infos), "shards": infos}
    splits.setdefault("val", {"documents": 0, "tokens": 0, "shards": []})
    if not splits["train"]["tokens"]:
        raise PipelineError(f"data.sources.{name}.shards={source.shards} holds no token: give it documents")
    if bad:
        log.info("shard: source %s: </s> appended where missing, copy written to %s", name, out_dir)
    body = {"splits": splits, "dtype": dtypes[0], "shards_from": str(Path(source.shards).expanduser().resolve())}
    return body if bad else {**body, "external": True}  # external: prefixes are absolute, the files stay in place


def _open(name: str, prefix: Path) -> IndexedDataset:
    try:
        ds = IndexedDataset(prefix)
    except (ValueError, OSError) as exc:
        raise PipelineError(f"data.sources.{name}: {prefix}.idx is not an MMIDIDX index ({exc}): give shards written "
                            f"by Megatron, GPT-NeoX or this pipeline") from None
    if not np.issubdtype(ds.dtype, np.integer):
        raise PipelineError(f"data.sources.{name}: {prefix}.idx declares {ds.dtype.name} tokens, not integer ids: "
                            f"these are not token shards")
    return ds


def _check(name: str, prefix: Path, ds: IndexedDataset, vocab_size: int, eos_id: int) -> int:
    """Every id inside the vocabulary; returns how many documents do not end with </s>."""
    tokens = ds.tokens
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise PipelineError(f"data.sources.{name}: {prefix}.bin holds token ids in [{int(tokens.min())}, "
                            f"{int(tokens.max())}], outside the vocabulary [0, {vocab_size}) of tokenizer.path: "
                            f"point tokenizer.path at the tokenizer the shards were written with")
    sizes = ds.sizes.astype(np.int64)
    if (sizes < 1).any():
        raise PipelineError(f"data.sources.{name}: {prefix}.idx has empty documents: rewrite the shards without them")
    last = ds.pointers // ds.dtype.itemsize + sizes - 1
    missing = int((tokens[last] != eos_id).sum()) if sizes.size else 0
    if missing:
        log.warning("shard: source %s: %d of %d documents of %s do not end with </s> (id %d)", name, missing,
                    sizes.size, prefix, eos_id)
    return missing


def missing_eos_error(name: str, prefix: Path, missing: int) -> PipelineError:
    return PipelineError(f"data.sources.{name}: {missing} documents of {prefix} do not end with </s>, so training "
                         f"would run them together: write the shards with Megatron's --append-eod, or set "
                         f"data.sources.{name}.missing_eos=append")


def _info(prefix: Path, ds: IndexedDataset) -> dict:
    paths = {kind: Path(f"{prefix}.{kind}") for kind in ("bin", "idx")}
    bin_sha, _ = _scan_bin(paths["bin"], ds.dtype)
    return asdict(ShardInfo(str(prefix), len(ds.sizes), ds.num_tokens, bin_sha, sha256_file(paths["idx"]),
                            paths["bin"].stat().st_size, paths["idx"].stat().st_size))


def _with_eos(ds: IndexedDataset, prefix: Path, eos_id: int) -> ShardInfo:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, ds.dtype) as writer:
        eos = np.array([eos_id], ds.dtype)
        for i in range(len(ds.sizes)):
            doc = ds[i]
            writer.add_document(doc if doc[-1] == eos_id else np.concatenate([doc, eos]))
        return writer.finalize()
