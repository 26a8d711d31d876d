"""The vocabulary every tokenizer of the pipeline shares: reserved pieces, their ids, and loading.

The tokenize stage trains SentencePiece models with these pieces at these ids; the shard, training
and export stages read a model through `load_tokenizer`, which checks it is usable.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PipelineError

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# ChatML-style turn markers for the finetune stage; reserved in every tokenizer so any base model can be tuned.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
IM_START, IM_END = CHAT_TOKENS
MIN_VOCAB = 256 + 4 + len(CHAT_TOKENS)  # byte-fallback pieces, unk/bos/eos/pad, the chat tokens


def load_tokenizer(path: Path):
    """A SentencePieceProcessor for `path`, or a PipelineError saying what is wrong with it."""
    import sentencepiece as spm

    if Path(path).is_dir():
        raise PipelineError(f"tokenizer {path} is a folder: point tokenizer.path at the SentencePiece .model file")
    if not Path(path).is_file():
        raise PipelineError(f"tokenizer {path} does not exist: run stages=[tokenize] or set tokenizer.path=")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise PipelineError(f"tokenizer {path} is not a SentencePiece model ({str(exc).splitlines()[0]}): point "
                            f"tokenizer.path at a SentencePiece .model file, or leave it unset to train one") from exc
    if sp.eos_id() < 0:
        raise PipelineError(f"tokenizer {path} has no end-of-sequence token (</s>); train one with this stage")
    return sp
