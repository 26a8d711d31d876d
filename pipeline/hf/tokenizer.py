"""The HF tokenizer files of an export, written from our SentencePiece model: the tokenizer's half of
the HF adapter (`hf_llama.py` maps the weights and config).

`tokenizer.json` is built from the SentencePiece model proto so that the fast tokenizer reproduces
SentencePiece exactly: no dummy prefix, byte fallback, BPE merges ranked by piece score, and `<s>`-like
text encoded as text (`split_special_tokens`), the way SentencePiece encodes it.
"""
from __future__ import annotations

from pathlib import Path

from ..data.chat import JINJA_TEMPLATE
from ..data.vocab import BOS, BOS_ID, CHAT_TOKENS, EOS, EOS_ID, PAD, PAD_ID, UNK, UNK_ID, load_tokenizer
from ..errors import PipelineError
from ..fsutil import atomic_write_bytes, atomic_write_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types


def fast_tokenizer(model_path: Path):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as the SentencePiece model does.

    Spaces become "▁" with nothing prepended (add_dummy_prefix=False); BPE merges are every split of
    each normal piece into two normal pieces, ranked by the piece's score (SentencePiece merges the
    best-scoring pair first); characters outside the vocabulary fall back to byte pieces. Control
    pieces (<s>, </s>, <pad>) and <unk> are plain vocabulary entries that no merge produces, so text
    such as "<s>" is encoded as text, as SentencePiece does; the chat tokens are added tokens.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    pieces, spec = proto.pieces, proto.normalizer_spec
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces or spec.precompiled_charsmap:
        raise PipelineError(f"{model_path}: only tokenizers trained by this pipeline (identity normalization, "
                            f"no dummy prefix) can be exported")
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece for p in pieces if p.type == NORMAL}
        ranked = sorted((-p.score, i, vocab[p.piece[:k]], p.piece[:k], p.piece[k:])
                        for i, p in enumerate(pieces) if p.type == NORMAL
                        for k in range(1, len(p.piece)) if p.piece[:k] in normal and p.piece[k:] in normal)
        model = BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                    unk_token=pieces[proto.trainer_spec.unk_id].piece, fuse_unk=True, byte_fallback=True)
    else:  # unigram: pieces SentencePiece never matches in text get a score no segmentation picks.
        # Segmentations of equal score may still differ (SentencePiece sums scores in float32).
        floor = min(p.score for p in pieces if p.type == NORMAL) * 10 - 1000
        model = Unigram([(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else floor) for p in pieces],
                        unk_id=proto.trainer_spec.unk_id, byte_fallback=True)
    tokenizer = Tokenizer(model)
    # The pre-tokenizer LlamaTokenizer (transformers 5) builds for add_prefix_space=False: the same.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                          for p in pieces if p.type == USER_DEFINED])
    return tokenizer


def _added_token(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def write_tokenizer(model_path: Path, out: Path, max_length: int) -> None:
    sp = load_tokenizer(model_path)
    for piece, expected in ((UNK, UNK_ID), (BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        if sp.piece_to_id(piece) != expected:
            raise PipelineError(f"{model_path}: {piece} has id {sp.piece_to_id(piece)}, expected {expected}")
    atomic_write_bytes(out / "tokenizer.model", Path(model_path).read_bytes())
    fast = fast_tokenizer(model_path)
    atomic_write_bytes(out / "tokenizer.json", fast.to_str(pretty=True).encode())
    specials = {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    atomic_write_json(out / "special_tokens_map.json", {k: _added_token(v, True) for k, v in specials.items()})
    added = {str(i): _added_token(sp.id_to_piece(i), special=sp.is_control(i) or sp.is_unknown(i))
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
             or sp.id_to_piece(i) in CHAT_TOKENS}
    atomic_write_json(out / "tokenizer_config.json", {
        # The generic fast class loads tokenizer.json as is, in transformers 4 and 5 alike, with the same ids.
        # Not LlamaTokenizer: transformers 4's LlamaTokenizerFast, given add_prefix_space (below), rebuilds
        # itself from the slow SentencePiece tokenizer, which needs protobuf (and crashes under protobuf<5).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "added_tokens_decoder": added,
        "add_bos_token": False,  # training documents carry no BOS (each ends with EOS)
        "add_eos_token": False,
        # SentencePiece was trained with add_dummy_prefix=False; llama.cpp's convert_hf_to_gguf.py reads this
        # key for the GGUF's add_space_prefix (without it the GGUF would prepend a space)
        "add_prefix_space": False,
        "legacy": False,
        # "<s>" in text is text for SentencePiece: do not match special tokens inside text
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": JINJA_TEMPLATE,
    })
