"""`export` stage: the newest complete checkpoint of a stage as an HF `LlamaForCausalLM` folder.

Weights: the fp32 master weights of any ZeRO stage are gathered one tensor at a time from the
per-rank files (memory-mapped, so neither the optimizer state nor the whole model is ever held in
memory, and the original world size does not matter) and streamed into safetensors files.
Tokenizer: `tokenizer.json` is built from the SentencePiece model proto so that the fast tokenizer
reproduces SentencePiece exactly: no dummy prefix, byte fallback, BPE merges ranked by piece score,
and `<s>`-like text encoded as text (`split_special_tokens`), the way SentencePiece encodes it.
Crash safety: everything is written into `export/<source>.tmp-PID/`, which replaces `export/<source>/`
only once complete; a new export removes the leftovers of an interrupted one.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import yaml

from .chat import IM_END, JINJA_TEMPLATE
from .checkpoint import find_resumable
from .config import ModelConfig, PipelineConfig
from .errors import PipelineError
from .fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, replace_dir, sha256_file
from .metrics import read_records
from .hf_llama import EMBEDDING_KEY, OUTPUT_KEY, hf_name, to_hf_config
from .redaction import redact, redact_text
from .tokenizer import BOS, CHAT_TOKENS, EOS, PAD, UNK, load_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("pretrain", "finetune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3


# -- reading checkpoints ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor that is gathered (in fp32 for ZeRO) only when `load()` is called."""
    shape: torch.Size
    load: Callable[[], torch.Tensor]


def _load_trusted(path: Path) -> dict:
    # DeepSpeed checkpoints pickle DeepSpeed objects, so weights_only=False: acceptable only because
    # these are our own files, written by our training stages. mmap: tensors are paged in on use.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def checkpoint_tensors(folder: Path) -> dict[str, LazyTensor]:
    """Our state-dict keys → lazy tensors, for a DeepSpeed checkpoint folder of any ZeRO stage."""
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:  # ZeRO 0: no partitions, the module holds the weights
        module = _load_trusted(folder / "mp_rank_00_model_states.pt")["module"]
        if any(t.dtype != torch.float32 for t in module.values()):
            log.warning("%s holds 16-bit weights (ZeRO 0 keeps its fp32 masters in the optimizer state): "
                        "used as they are", folder)
        return {name: LazyTensor(t.shape, lambda t=t: t) for name, t in module.items()}
    from deepspeed.utils import zero_to_fp32 as z

    if _load_trusted(optim_files[0])["optimizer_state_dict"].get("zero_stage") == 3:
        # lazy: each GatheredTensor concatenates one parameter's slices from all ranks when asked
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            state = z.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
        return {name: LazyTensor(t.shape, t.contiguous) for name, t in state.items()}
    # ZeRO 1/2, and bf16 ZeRO 1 (BF16_Optimizer, which zero_to_fp32 rejects): each rank holds an equal
    # slice of every flattened fp32 group. zero_to_fp32 concatenates whole groups; we slice lazily.
    states = [_load_trusted(Path(f))["optimizer_state_dict"] for f in z.get_optim_files(str(folder))]
    counts = states[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else counts
    if world != len(states):
        raise PipelineError(f"checkpoint {folder} has {len(states)} optimizer files, written by {world} ranks")
    flat_groups = [s["single_partition_of_fp32_groups"] for s in states]
    paddings = states[0].get("param_alignment_paddings")
    model_state = _load_trusted(folder / "mp_rank_00_model_states.pt")
    tensors: dict[str, LazyTensor] = {}
    for group, shapes in enumerate(model_state["param_shapes"]):
        partitions = [rank_groups[group] for rank_groups in flat_groups]  # rank order = flat order
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            tensors[name] = LazyTensor(torch.Size(shape), lambda p=partitions, o=offset, n=numel, s=shape:
                                       _slice_partitions(p, o, n).view(s))
            offset += numel + (paddings[group][index] if paddings else 0)
        available, align = sum(p.numel() for p in partitions), 2 * world  # as zero_to_fp32 checks it
        if math.ceil(offset / align) != math.ceil(available / align):
            raise PipelineError(f"checkpoint {folder}: group {group} holds {available} values, its parameters "
                                f"{offset}; the checkpoint is damaged or not from this DeepSpeed version")
    for alias, target in model_state.get("shared_params", {}).items():
        tensors[alias] = tensors[target]
    return tensors


def _slice_partitions(partitions: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Values [start, start + numel) of the concatenation of `partitions`, without concatenating them."""
    chunks, base = [], 0
    for part in partitions:
        low, high = max(start, base), min(start + numel, base + part.numel())
        if low < high:
            chunks.append(part[low - base:high - base])
        base += part.numel()
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def model_config_for(cfg: PipelineConfig, record: dict, vocab_pieces: int) -> ModelConfig:
    """The ModelConfig recorded with the checkpoint, else cfg.model with the tokenizer's vocabulary."""
    saved = record.get("trainer_state", {}).get("model")
    if saved:
        known = {f.name for f in fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    else:
        model_cfg = replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab_pieces)
    if model_cfg.vocab_size < vocab_pieces:
        raise PipelineError(f"model vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_pieces}")
    return model_cfg


def expected_shapes(c: ModelConfig) -> dict[str, torch.Size]:
    """`Transformer(c).state_dict()`'s names and shapes (building even a meta model costs seconds)."""
    q, kv = c.dim // c.n_heads * c.n_heads, c.dim // c.n_heads * c.n_kv_heads
    per_layer = {"attention_norm.weight": (c.dim,), "attention.wq.weight": (q, c.dim),
                 "attention.wk.weight": (kv, c.dim), "attention.wv.weight": (kv, c.dim),
                 "attention.wo.weight": (c.dim, q), "ffn_norm.weight": (c.dim,),
                 "feed_forward.w1.weight": (c.ffn_dim, c.dim), "feed_forward.w3.weight": (c.ffn_dim, c.dim),
                 "feed_forward.w2.weight": (c.dim, c.ffn_dim)}
    shapes = {EMBEDDING_KEY: (c.vocab_size, c.dim)}
    for layer in range(c.n_layers):
        shapes.update({f"layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    shapes.update({"norm.weight": (c.dim,), OUTPUT_KEY: (c.vocab_size, c.dim)})
    return {name: torch.Size(shape) for name, shape in shapes.items()}


# -- writing safetensors ---------------------------------------------------------------------------
def write_safetensors(path: Path, entries: list[tuple[str, LazyTensor]], dtype: torch.dtype) -> None:
    """The safetensors format written by hand: header first (all shapes are known), then each tensor's
    bytes as it is gathered, so only one tensor is in memory at a time."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, lazy in entries:
        nbytes = math.prod(lazy.shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(lazy.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, lazy in entries:
            tensor = lazy.load().to(dtype).contiguous()
            if tensor.shape != lazy.shape:
                raise PipelineError(f"{name}: gathered shape {tuple(tensor.shape)}, expected {tuple(lazy.shape)}")
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def write_weights(tensors: dict[str, LazyTensor], model_cfg: ModelConfig, dtype: torch.dtype, out: Path,
                  max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards of at most max_shard_bytes (a larger tensor gets its own)
    and model.safetensors.index.json, under HF names."""
    shapes = expected_shapes(model_cfg)
    missing = sorted(set(shapes) - set(tensors))
    wrong = sorted(n for n in shapes if n in tensors and tensors[n].shape != shapes[n])
    if missing or wrong:
        raise PipelineError(f"the checkpoint does not match the model config ({model_cfg.name}): missing "
                            f"{missing[:3]}, other shapes {wrong[:3]}; export with the model= it was trained with")
    entries = [(hf_name(name), tensors[name]) for name in shapes
               if not (model_cfg.tie_embeddings and name == OUTPUT_KEY)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1].shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", entries, dtype)
        return
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, dtype)
        weight_map.update({hf: name for hf, _ in shard})
    total = sum(math.prod(lazy.shape) for _, lazy in entries) * itemsize
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})


# -- tokenizer ---------------------------------------------------------------------------------------
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
    for piece, expected in ((UNK, 0), (BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        if sp.piece_to_id(piece) != expected:
            raise PipelineError(f"{model_path}: {piece} has id {sp.piece_to_id(piece)}, expected {expected}")
    atomic_write_bytes(out / "tokenizer.model", Path(model_path).read_bytes())
    fast = fast_tokenizer(model_path)
    is_bpe = type(fast.model).__name__ == "BPE"
    atomic_write_bytes(out / "tokenizer.json", fast.to_str(pretty=True).encode())
    specials = {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    atomic_write_json(out / "special_tokens_map.json", {k: _added_token(v, True) for k, v in specials.items()})
    added = {str(i): _added_token(sp.id_to_piece(i), special=sp.is_control(i) or sp.is_unknown(i))
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
             or sp.id_to_piece(i) in CHAT_TOKENS}
    atomic_write_json(out / "tokenizer_config.json", {
        # LlamaTokenizer (transformers 5) rebuilds a BPE from tokenizer.json's vocab and merges with the
        # pre-tokenizer above; a unigram model needs the generic class, which loads tokenizer.json as is.
        "tokenizer_class": "LlamaTokenizer" if is_bpe else "PreTrainedTokenizerFast",
        **specials,
        "added_tokens_decoder": added,
        "add_bos_token": False,  # training documents carry no BOS (each ends with EOS)
        "add_eos_token": False,
        "add_prefix_space": False,  # SentencePiece was trained with add_dummy_prefix=False
        "legacy": False,
        # "<s>" in text is text for SentencePiece: do not match special tokens inside text
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": JINJA_TEMPLATE,
    })


# -- config files and model card ------------------------------------------------------------------------
def write_configs(model_cfg: ModelConfig, dtype_name: str, im_end_id: int, out: Path) -> None:
    # transformers 5 reads "dtype", 4.x "torch_dtype"; 5.x ignores torch_dtype when dtype is set.
    atomic_write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, im_end_id],
                                                       "pad_token_id": PAD_ID})
    # Last: a folder without config.json does not load, should a kill leave a staging folder behind.
    atomic_write_json(out / "config.json", to_hf_config(model_cfg, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                                        pad_token_id=PAD_ID, dtype=dtype_name,
                                                        torch_dtype=dtype_name, use_cache=True))


def last_losses(run_dir: Path, stage: str, step: int) -> dict[str, tuple[int, float] | None]:
    """The last train loss and val loss of `stage` logged at or before `step`."""
    found = {"loss": None, "val_loss": None}
    for record in read_records(run_dir / "metrics.jsonl"):
        if record.get("stage") == stage and record.get("step", step + 1) <= step:
            for key in found:
                if record.get(key) is not None:
                    found[key] = (record["step"], record[key])
    return found


def model_card(run_dir: Path, source: str, folder: Path, record: dict, model_cfg: ModelConfig, dtype_name: str) -> str:
    from .model import num_params

    state = record.get("trainer_state", {})
    manifest = run_dir / "shards" / "manifest.json"
    losses = last_losses(run_dir, source, record["step"])
    shown = {k: f"{v[1]:.4f} (step {v[0]})" if v else "not logged" for k, v in losses.items()}
    config_path = run_dir / "config.yaml"
    config = yaml.safe_dump(redact(yaml.safe_load(config_path.read_text())), sort_keys=False) \
        if config_path.is_file() else "(no config.yaml in the run directory)\n"
    rows = [("source stage", source), ("checkpoint", f"{folder.name} (step {record['step']})"),
            ("tokens seen", f"{state.get('tokens_seen', 0):,}"), ("final train loss", shown["loss"]),
            ("final val loss", shown["val_loss"]),
            ("shards manifest sha256", sha256_file(manifest) if manifest.is_file() else "missing"),
            ("model", f"{model_cfg.name}: {num_params(model_cfg, exclude_embedding=False) / 1e6:.1f}M parameters, "
                      f"vocab {model_cfg.vocab_size}, context {model_cfg.max_seq_len}"),
            ("weights dtype", dtype_name)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {run_dir.name}: {source}

A Llama-architecture causal language model exported by the pipeline's `export` stage.

| | |
| --- | --- |
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
```

The fast tokenizer gives the SentencePiece ids of `tokenizer.model` (no dummy prefix, no BOS added;
training documents end with `</s>`). Chat turns use `<|im_start|>role\\n content<|im_end|>`
(`tokenizer.apply_chat_template`); generation stops at `</s>` or `<|im_end|>`.

## Resolved config

```yaml
{config}```
"""


# -- the stage ---------------------------------------------------------------------------------------
def export_model(cfg: PipelineConfig, run_dir: Path, source: str) -> Path:
    """Write run_dir/export/<source>/ from the newest complete checkpoint of `source`; returns the folder."""
    if source not in SOURCES:
        raise PipelineError(f"export source {source!r}: choose one of {list(SOURCES)}")
    if cfg.export.dtype not in DTYPES:
        raise PipelineError(f"export.dtype={cfg.export.dtype!r}: choose one of {list(DTYPES)}")
    root = run_dir / source / "checkpoints"
    found = find_resumable(root, digests=True)  # its files are unpickled below: contents must match the record
    if found is None:
        raise PipelineError(f"no complete {source} checkpoint under {root}: run stages=[{source}] first")
    folder, record = found
    tokenizer_path = run_dir / "tokenizer" / "tokenizer.model"
    sp = load_tokenizer(tokenizer_path)
    model_cfg = model_config_for(cfg, record, sp.get_piece_size())
    target = run_dir / "export" / source
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f"{source}.tmp-*"):  # an interrupted export's, unless still running
        if not _pid_alive(leftover.name.rsplit("-", 1)[-1]):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = target.with_name(f"{source}.tmp-{os.getpid()}")
    staging.mkdir()
    try:
        tensors = checkpoint_tensors(folder)
        write_weights(tensors, model_cfg, DTYPES[cfg.export.dtype], staging,
                      max(1, int(cfg.export.max_shard_size_gb * 1e9)))
        write_tokenizer(tokenizer_path, staging, model_cfg.max_seq_len)
        card = model_card(run_dir, source, folder, record, model_cfg, cfg.export.dtype)
        atomic_write_bytes(staging / "README.md", redact_text(card).encode())
        write_configs(model_cfg, cfg.export.dtype, sp.piece_to_id(IM_END), staging)
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("export: %s %s (step %d) → %s", source, folder.name, record["step"], target)
    return target


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def run_export(cfg: PipelineConfig, run_dir: Path) -> list[Path]:
    """The stage: export cfg.export.source ("all": each stage with a complete checkpoint); the files written."""
    source = cfg.export.source
    if source == "all":
        sources = [s for s in SOURCES if find_resumable(run_dir / s / "checkpoints") is not None]
        if not sources:
            raise PipelineError(f"no complete pretrain or finetune checkpoint under {run_dir}: "
                                f"run stages=[pretrain] first")
    elif source in SOURCES:
        sources = [source]
    else:
        raise PipelineError(f"export.source={source!r}: choose pretrain, finetune or all")
    files = []
    for name in sources:
        folder = export_model(cfg, run_dir, name)
        files += sorted(p for p in folder.iterdir() if p.is_file())
    return files
