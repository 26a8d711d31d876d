"""`tokenize` stage: train a lossless SentencePiece model on a sample of the corpus.

Lossless means `decode(encode(x)) == x` for any UTF-8 text: identity normalization, no dummy
prefix, no whitespace collapsing, whitespace-only pieces allowed, and byte fallback for every
character the vocabulary lacks. (The one exception is SentencePiece's own U+2581 "▁", which it
uses for the space and so decodes as " ".)
"""
from __future__ import annotations

import io
import logging
import os
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
from tqdm import tqdm

from ..config import TokenizerConfig
from ..data.corpus import Corpus
from ..data.vocab import BOS, BOS_ID, CHAT_TOKENS, EOS, EOS_ID, PAD, PAD_ID, UNK, UNK_ID, load_tokenizer
from ..errors import PipelineError
from ..fsutil import atomic_write_bytes, sha256_file
from .context import Context

log = logging.getLogger(__name__)


# -- the stage's face ------------------------------------------------------------------------------------
def inputs(ctx: Context) -> dict:
    cfg = ctx.cfg.tokenizer
    if cfg.path:
        path = Path(cfg.path)
        return {"reuse_sha256": sha256_file(path) if path.is_file() else "missing"}
    data = {k: v for k, v in asdict(ctx.cfg.data).items() if k not in ("val_fraction", "max_repetitions", "phases")}
    settings = {k: v for k, v in asdict(cfg).items() if k != "num_threads"}
    return {"tokenizer": settings, "data": data, "corpus": ctx.corpus_identity()}


def run(ctx: Context) -> list[Path]:
    if ctx.cfg.tokenizer.path:
        reuse_tokenizer(Path(ctx.cfg.tokenizer.path), ctx.layout.tokenizer)
    else:
        text = [name for name, source in ctx.sources.items() if not source.shards]
        corpora = [(ctx.source_corpus(name), ctx.sources[name].weight) for name in text]
        train_tokenizer(corpora, ctx.cfg.tokenizer, ctx.layout.tokenizer, seed=ctx.cfg.data.seed, names=text)
    return [ctx.layout.tokenizer]


def training_chunks(texts: Iterator[str], max_bytes: int) -> Iterator[str]:
    """Cut documents into chunks of whole lines (newlines kept) of at most `max_bytes` bytes.

    SentencePiece drops any training sentence longer than max_sentence_length, so long documents
    are cut rather than lost; keeping the newlines lets it learn pieces such as ":\\n".
    """
    for text in texts:
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            line_bytes = len(line.encode("utf-8", "surrogatepass"))
            if chunk and size + line_bytes > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            if line_bytes > max_bytes:  # one very long line: cut it into pieces
                step = max(1, max_bytes // 4)  # a UTF-8 character is at most 4 bytes
                for start in range(0, len(line), step):
                    yield line[start:start + step]
                continue
            chunk.append(line)
            size += line_bytes
        if chunk:
            yield "".join(chunk)


def sample_shares(sizes: list[int], weights: list[float], max_sample_mb: float) -> list[float]:
    """The share of each source's chunks to keep, so that the sample holds the sources in proportion to their
    weights, as training will, with about max_sample_mb of text in all (0: no cap, all of it). A source too
    small for its share gives all it has and the others share the rest of the budget (water-filling)."""
    if not max_sample_mb:
        return [1.0] * len(sizes)
    keep = [0.0] * len(sizes)
    remaining, active = max_sample_mb * 1e6, [i for i, w in enumerate(weights) if w > 0 and sizes[i]]
    while active:
        total = sum(weights[i] for i in active)
        small = [i for i in active if sizes[i] <= remaining * weights[i] / total]
        if not small:
            for i in active:
                keep[i] = remaining * weights[i] / total / sizes[i]
            break
        for i in small:
            keep[i], remaining = 1.0, remaining - sizes[i]
        active = [i for i in active if i not in small]
    return keep


def train_tokenizer(corpora: Corpus | list[tuple[Corpus, float]], cfg: TokenizerConfig, out_path: Path,
                    seed: int, names: list[str] | None = None) -> None:
    """On one corpus, or on a mixture's text sources as (corpus, weight): sampled in proportion to the weights."""
    corpora = [(corpora, 1.0)] if isinstance(corpora, Corpus) else list(corpora)
    threads = cfg.num_threads or os.cpu_count() or 1
    progress = tqdm(desc="tokenize: reading", unit="doc", unit_scale=True, mininterval=1.0)
    # SentencePiece holds its whole sample in memory, and input_sentence_size counts chunks of up to
    # max_sentence_bytes (2M x 8 KiB = 16 GB): long documents also need a cap in bytes. A seeded share of the
    # chunks (not documents: one huge document must not be all or nothing), from the corpus's size on disk,
    # keeps about max_sample_mb of text (less for JSON, whose quoting counts on disk; more for compressed parquet).
    sizes = [sum(Path(p).stat().st_size for p in corpus.paths) for corpus, _ in corpora]
    if len(corpora) == 1:
        keeps = [min(1.0, cfg.max_sample_mb * 1e6 / sizes[0]) if cfg.max_sample_mb and sizes[0] else 1.0]
    else:
        keeps = sample_shares(sizes, [w for _, w in corpora], cfg.max_sample_mb)
    sampler = random.Random(seed)
    if min(keeps) < 1:
        shown = [f"{100 * k:.1f}%" + (f" of {n}" if n else "") for k, n in zip(keeps, names or [""] * len(keeps))]
        log.info("tokenize: %s of the text sampled for training (%.0f MB on disk, tokenizer.max_sample_mb=%g)",
                 ", ".join(shown), sum(sizes) / 1e6, cfg.max_sample_mb)

    def sentences() -> Iterator[str]:
        for (corpus, _), keep in zip(corpora, keeps):
            for text in corpus.texts():
                progress.update()
                for chunk in training_chunks([text], cfg.max_sentence_bytes):
                    if keep == 1 or sampler.random() < keep:
                        yield chunk

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # sampling and shuffling: the same corpus gives the same model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            character_coverage=cfg.character_coverage,
            max_sentence_length=cfg.max_sentence_bytes,
            num_threads=threads,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            user_defined_symbols=list(CHAT_TOKENS),
            minloglevel=2,
        )
    except RuntimeError as exc:
        message = " ".join(str(exc).split())
        if not documents(corpora):
            raise PipelineError("the corpus has no non-empty document: check data.paths and data.text_field") from exc
        too_high = re.search(r"Vocabulary size too high.*?<= (\d+)", message)
        if too_high:
            raise PipelineError(f"tokenizer.vocab_size={cfg.vocab_size} is too large for this corpus (at most "
                                f"{too_high.group(1)} fits); lower tokenizer.vocab_size or add text") from exc
        raise PipelineError(f"SentencePiece training failed: {message}") from exc
    finally:
        progress.close()
    if not documents(corpora):
        raise PipelineError("the corpus has no non-empty document: check data.paths and data.text_field")
    empty = [name for name, (corpus, _) in zip(names or [], corpora) if not corpus.stats.documents]
    if empty:
        raise PipelineError(f"the corpus has no non-empty document (source {empty[0]}): check "
                            f"data.sources.{empty[0]}.paths and its text_field")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, model.getvalue())
    log.info("tokenize: %d documents read (%d empty skipped, %d characters replaced), vocab %d, wrote %s",
             documents(corpora), sum(c.stats.skipped_empty for c, _ in corpora),
             sum(c.stats.replaced_chars for c, _ in corpora),
             cfg.vocab_size, out_path)


def documents(corpora: list[tuple[Corpus, float]]) -> int:
    return sum(corpus.stats.documents for corpus, _ in corpora)


def reuse_tokenizer(source: Path, out_path: Path) -> None:
    """`tokenizer.path`: check the given model and make it this run's tokenizer."""
    sp = load_tokenizer(source)
    if not any(sp.is_byte(i) for i in range(sp.get_piece_size())):
        log.warning("tokenizer %s has no byte fallback: characters outside its vocabulary become <unk>", source)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, Path(source).read_bytes())
