"""State-dict adapter between `pipeline.train.model.Transformer` and HF `LlamaForCausalLM` (torchtitan style):
names, config.json, and the safetensors files an export writes (`hf_tokenizer.py` is the tokenizer's half).

Only names differ: the model rotates q/k in HF's rotate_half convention, so no weight is permuted.
The name mapping is a pure function of one key, so an exporter streams tensors one at a time.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch

from ..checkpoint.reader import LazyTensor
from ..config import ModelConfig
from ..errors import PipelineError
from ..fsutil import atomic_write_json

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_LEVEL_FROM_HF = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_PER_LAYER_FROM_HF = {hf: ours for ours, hf in _PER_LAYER.items()}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
OUTPUT_KEY = "output.weight"  # absent from HF files when tied: HF reuses the embedding
EMBEDDING_KEY = "tok_embeddings.weight"


def _rename(name: str, top_level: dict, per_layer: dict, layer_prefix: str, new_layer_prefix: str) -> str:
    if name in top_level:
        return top_level[name]
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", name)
    if match and match.group(2) in per_layer:
        return f"{new_layer_prefix}{match.group(1)}.{per_layer[match.group(2)]}"
    raise ValueError(f"{name!r} is not a Llama weight name")


def hf_name(our_name: str) -> str:
    """HF LlamaForCausalLM name of one of our state-dict keys."""
    return _rename(our_name, _TOP_LEVEL, _PER_LAYER, "layers.", "model.layers.")


def our_name(hf_name: str) -> str:
    """Our state-dict key for one HF LlamaForCausalLM name."""
    return _rename(hf_name, _TOP_LEVEL_FROM_HF, _PER_LAYER_FROM_HF, "model.layers.", "layers.")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under HF names, as HF files hold it: no lm_head.weight when embeddings are tied."""
    return {hf_name(name): tensor for name, tensor in state.items()
            if not (cfg.tie_embeddings and name == OUTPUT_KEY)}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF Llama state dict (from a file or a model) as ours, ready for load_state_dict(strict=True)."""
    ours = {our_name(name): tensor for name, tensor in state.items()}
    if cfg.tie_embeddings:
        # Our state dict lists the shared matrix under both names; HF files keep only the embedding.
        ours[OUTPUT_KEY] = ours[EMBEDDING_KEY]
    return ours


def to_hf_config(cfg: ModelConfig, **extra) -> dict:
    """config.json fields for transformers.LlamaConfig; extra adds or overrides (dtype, bos/eos ids...)."""
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size is None: set it before exporting")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Top-level rope_theta is read by transformers 4.x and converted by 5.x (into rope_parameters).
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        **extra,
    }


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig for an HF Llama config.json (as a dict); ValueError for anything the model cannot run."""
    architectures = hf_config.get("architectures")
    if architectures != ["LlamaForCausalLM"]:
        raise ValueError(f"architectures={architectures}: only LlamaForCausalLM checkpoints can be loaded")
    missing = [key for key in _REQUIRED if hf_config.get(key) is None]
    if missing:
        raise ValueError(f"HF config lacks {missing}")
    unsupported = {key: hf_config[key] for key in ("attention_bias", "mlp_bias") if hf_config.get(key)}
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf_config["hidden_act"]
    # transformers 4.x writes rope_theta and rope_scaling; 5.x writes rope_parameters.
    rope = hf_config.get("rope_parameters") or {}
    if hf_config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        unsupported["rope scaling"] = hf_config.get("rope_scaling") or rope
    dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    if hf_config.get("head_dim") not in (None, dim // n_heads):
        unsupported["head_dim"] = hf_config["head_dim"]
    if unsupported:
        raise ValueError(f"this Llama variant is not supported by pipeline.train.model: {unsupported}")
    return ModelConfig(
        name="hf",
        vocab_size=hf_config["vocab_size"],
        dim=dim,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
        ffn_dim=hf_config["intermediate_size"],
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        rope_theta=float(hf_config.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf_config.get("tie_word_embeddings", False),
        init_std=hf_config.get("initializer_range", 0.02),
    )


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
