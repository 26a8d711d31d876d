"""The corpus as a stream of documents, read through HF `datasets` in streaming mode.

Memory stays bounded whatever the corpus size: files are streamed record by record and handed out
in batches of at most `batch_bytes` of text. Bad bytes never stop a run: invalid UTF-8 and NUL
characters become U+FFFD and are counted; empty documents are skipped and counted.
"""
from __future__ import annotations

import codecs
import glob
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import DataConfig
from ..errors import PipelineError

log = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REPLACEMENT = "\ufffd"


@dataclass
class CorpusStats:
    documents: int = 0
    text_bytes: int = 0
    skipped_empty: int = 0
    replaced_chars: int = 0  # invalid UTF-8 sequences and NULs, now U+FFFD

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DocumentBatch:
    indices: list[int] = field(default_factory=list)  # position of each text in the corpus stream
    texts: list[str] = field(default_factory=list)
    num_bytes: int = 0  # approximate: characters


# Invalid UTF-8 is counted as it is decoded: datasets passes `encoding_errors` on to open().
_invalid_utf8 = [0]


def _count_and_replace(exc: UnicodeDecodeError):
    _invalid_utf8[0] += 1
    return REPLACEMENT, exc.end


codecs.register_error("pipeline_replace", _count_and_replace)


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand files, directories (recursively, known suffixes) and globs to a sorted file list."""
    if not patterns:
        raise PipelineError("data.paths is empty: give data.paths=[file,dir,glob,...] with data=files")
    found: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
            if not matches:
                raise PipelineError(f"data.paths: the glob {pattern!r} matches no file")
        elif os.path.isdir(pattern):
            matches = [p for p in Path(pattern).rglob("*") if p.suffix.lower() in BUILDERS]
            if not matches:
                raise PipelineError(f"data.paths: the folder {pattern!r} holds no {'/'.join(BUILDERS)} file")
        elif os.path.exists(pattern):
            matches = [Path(pattern)]
        else:
            raise PipelineError(f"data.paths: {pattern!r} does not exist")
        for path in matches:
            if path.is_file():
                if path.suffix.lower() not in BUILDERS:
                    raise PipelineError(f"data.paths: {str(path)!r} is not one of {', '.join(BUILDERS)}")
                found.add(path.resolve())
    return sorted(found)


def files_fingerprint(paths: list[Path]) -> list[list]:
    """Cheap identity of the input files (like make: path, size, mtime) for stage skipping."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


class Corpus:
    """Streams the documents of `paths` in a fixed order: files sorted, records in file order."""

    def __init__(self, paths: list[Path], data: DataConfig):
        self.paths = paths
        self.data = data
        self.stats = CorpusStats()

    def texts(self) -> Iterator[str]:
        """Every non-empty document, cleaned, in corpus order."""
        for texts in self.text_lists():
            yield from texts

    def text_lists(self) -> Iterator[list[str]]:
        """The documents of `texts`, a list per batch of records read (per-document Python costs add up on
        corpora of many small documents)."""
        for builder, paths in _runs_of_clean_files(self.paths):
            if len(paths) == 1:
                yield from self._file_texts(paths[0])
            else:
                yield from self._clean(self._group_records(paths, builder), paths[0])

    def batches(self, batch_bytes: int, num_parts: int = 1, part: int = 0) -> Iterator[DocumentBatch]:
        """Documents in batches of about `batch_bytes`; with `num_parts`, only every num_parts-th
        document starting at `part`, so that jobs split one corpus between them. A batch ends with the
        document that brings it to `batch_bytes` (characters: close enough to bytes for sizing a batch)."""
        batch = DocumentBatch()
        start = 0  # corpus index of the next list's first document
        for texts in self.text_lists():
            first = (part - start) % num_parts
            mine, indices = texts[first::num_parts], range(start + first, start + len(texts), num_parts)
            start += len(texts)
            sizes = np.cumsum(np.fromiter(map(len, mine), dtype=np.int64, count=len(mine)))
            done = 0
            while done < len(mine):
                reached = np.searchsorted(sizes, sizes[done] - len(mine[done]) + batch_bytes - batch.num_bytes)
                end = min(int(reached) + 1, len(mine))
                batch.texts += mine[done:end]
                batch.indices += indices[done:end]
                batch.num_bytes += int(sizes[end - 1] - sizes[done]) + len(mine[done])
                done = end
                if batch.num_bytes >= batch_bytes:
                    yield batch
                    batch = DocumentBatch()
        if batch.texts:
            yield batch

    def _file_texts(self, path: Path) -> Iterator[str]:
        builder = BUILDERS[path.suffix.lower()]
        before = _invalid_utf8[0]
        try:
            if builder == "json" and not _is_valid_utf8(path):
                # pyarrow's JSON reader ignores encoding_errors: read a repaired copy instead.
                with tempfile.TemporaryDirectory(prefix="pipeline-utf8-") as tmp:
                    repaired = Path(tmp) / path.name
                    _repair_utf8(path, repaired)
                    yield from self._clean(self._records(repaired, builder, shown_as=path), path)
            else:
                yield from self._clean(self._records(path, builder), path)
        finally:
            replaced = _invalid_utf8[0] - before
            if replaced:
                self.stats.replaced_chars += replaced
                log.warning("%s: %d invalid UTF-8 sequences replaced by U+FFFD", path, replaced)

    def _group_records(self, paths: list[Path], builder: str) -> Iterator[pa.Array]:
        """The text columns of several valid UTF-8 files of one builder, read as one stream: one
        `datasets` reader for all of them rather than one per file (each costs ~0.1 s of setup, threads
        and progress bars, which dominates on thousands of small files). On any error (a bad file, columns
        that differ between files) the files are read again one at a time, past the records already
        handed out, so the error names its file as a one-file read does."""
        done = 0
        try:
            for column in self._records(paths[0], builder, files=paths):
                yield column
                done += len(column)
        except Exception:
            for path in paths:
                for column in self._records(path, builder):
                    skip = min(done, len(column))
                    done -= skip
                    if skip < len(column):
                        yield column.slice(skip)

    def _records(self, path: Path, builder: str, shown_as: Path | None = None,
                 files: list[Path] | None = None) -> Iterator[pa.Array]:
        """The text column of `path` (or of all `files`, in order), one Arrow array per batch of records."""
        import datasets  # slow to import; only stages that read the corpus pay for it

        shown = shown_as or path
        files = files or [path]
        field_name = "text" if builder == "text" else self.data.text_field
        kwargs = {}
        if builder == "text":
            kwargs = dict(sample_by="paragraph" if self.data.split_on_blank_lines else "document",
                          keep_linebreaks=True, encoding_errors="pipeline_replace")
        try:
            with _no_torch_in_datasets(datasets):
                ds = datasets.load_dataset(builder, data_files={"train": _resolved(files)}, split="train",
                                           streaming=True, **kwargs).with_format("arrow")
            for table in ds.iter(batch_size=1024):
                if field_name not in table.column_names:
                    columns = ", ".join(table.column_names) or "none"
                    raise PipelineError(f"{shown}: no field {field_name!r} (columns: {columns}); set data.text_field=")
                column = table.column(field_name)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                        or pa.types.is_null(column.type)):
                    raise PipelineError(f"{shown}: field {field_name!r} holds {column.type}, not text; "
                                        f"point data.text_field at a string column")
                yield column
        except PipelineError:
            raise
        except Exception as exc:  # pyarrow / datasets parse errors name the row but not always the file
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(f"{shown}: cannot read as {builder}: {message}") from exc

    def _clean(self, columns: Iterator[pa.Array], path: Path) -> Iterator[list[str]]:
        """Count, repair and filter records: empty ones are skipped, NULs become U+FFFD."""
        for column in columns:
            if pa.types.is_null(column.type):
                self.stats.skipped_empty += len(column)
                continue
            text_bytes = pc.sum(pc.binary_length(column)).as_py() or 0  # in Arrow, without copies
            nuls = pc.sum(pc.count_substring(column, "\x00")).as_py() or 0
            records = column.to_pylist()
            texts = [record for record in records if record and not record.isspace()]
            if len(texts) < len(records):
                self.stats.skipped_empty += len(records) - len(texts)
                text_bytes -= sum(len(r.encode("utf-8", "surrogatepass")) for r in records if r and r.isspace())
            if nuls:
                self.stats.replaced_chars += nuls
                text_bytes += 2 * nuls  # U+FFFD takes three bytes
                texts = [text.replace("\x00", REPLACEMENT) for text in texts]
            self.stats.documents += len(texts)
            self.stats.text_bytes += text_bytes
            if texts:
                yield texts


def _runs_of_clean_files(paths: list[Path]) -> Iterator[tuple[str, list[Path]]]:
    """(builder, files) in corpus order: consecutive files of one builder that can be read as one stream
    (text and JSON that is valid UTF-8, and parquet); any other file on its own."""
    run: list[Path] = []
    for path in paths:
        builder = BUILDERS[path.suffix.lower()]
        alone = len(paths) > 1 and builder != "parquet" and not _is_valid_utf8(path)  # repaired or counted per file
        if run and (alone or BUILDERS[run[0].suffix.lower()] != builder):
            yield BUILDERS[run[0].suffix.lower()], run
            run = []
        if alone:
            yield builder, [path]
        else:
            run.append(path)
    if run:
        yield BUILDERS[run[0].suffix.lower()], run


def _resolved(files: list[Path]):
    """`files` as datasets' list of resolved data files (with the mtimes it hashes, as it records local files):
    datasets would otherwise resolve each path as a glob pattern, which costs more than reading a 24 KB file."""
    from datasets.data_files import DataFilesList

    return DataFilesList([str(f) for f in files], [(str(f.stat().st_mtime),) for f in files])


@contextmanager
def _no_torch_in_datasets(datasets):
    """Streaming datasets import torch (2 s, 200 MB) to share state with DataLoader workers, which
    we never use: hide torch from them while the dataset is built."""
    config = datasets.config
    saved = getattr(config, "TORCH_AVAILABLE", None)
    config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        config.TORCH_AVAILABLE = saved


def _is_valid_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _repair_utf8(src: Path, dst: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="pipeline_replace")
    with open(src, "rb") as fin, open(dst, "w", encoding="utf-8") as fout:
        while block := fin.read(1 << 22):
            fout.write(decoder.decode(block))
        fout.write(decoder.decode(b"", final=True))
