"""Document masks: which earlier positions a token attends to when one window packs several documents
(pretraining with train.document_mask) or several examples (fine-tuning with finetune.pack_isolate).

One mechanism for both. A batch carries segment ids [B, T]: in pretraining each document's number within
its window, cut after every EOS (`document_segments`); in fine-tuning each packed example's, -1 for padding
(sft_data). `build` turns them, once per micro batch, into the one mask every layer shares: position q
attends to position k iff k <= q and segments[q] == segments[k]. The model only reads the mask; the
export is unchanged (a plain HF Llama: the mask is a training-time choice).

Two kinds of mask, chosen by `choose_kind`:
- "flex": a FlexAttention BlockMask, attended with compiled `flex_attention`: a fused kernel that skips
  the blocks the mask leaves out. Used on CUDA.
- "dense": a [B, 1, T, T] bool mask for scaled_dot_product_attention: exact, but off the flash path. Used
  where FlexAttention cannot train: on CPU torch 2.13 has no FlexAttention backward, and its forward there
  either materialises the scores unfused (eager) or needs an inductor compile; and with attention dropout,
  which flex_attention lacks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLEX, DENSE = "flex", "dense"

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense masks only
    BlockMask, create_block_mask, flex_attention = (), None, None

_compiled_flex = None  # torch.compile(flex_attention), made on first use on a GPU


def choose_kind(device: torch.device, dropout: float = 0.0) -> tuple[str, str]:
    """(FLEX or DENSE, why): the mask `build` makes for training on `device`."""
    if create_block_mask is None:
        return DENSE, f"torch {torch.__version__} has no FlexAttention (needs 2.5 or later)"
    if device.type != "cuda":
        return DENSE, (f"FlexAttention has no backward on {device.type} in torch {torch.__version__}; "
                       f"a dense [B, 1, T, T] mask with scaled_dot_product_attention is exact")
    if dropout > 0:
        return DENSE, f"model.dropout={dropout}: FlexAttention has no attention dropout"
    return FLEX, "FlexAttention block masks (compiled flex_attention, one mask per micro batch)"


def build(segments: torch.Tensor, kind: str):
    """The mask of segment ids [B, T] (on the training device): a BlockMask (FLEX) or a [B, 1, T, T] bool
    tensor (DENSE). Built once per micro batch; every layer reuses it."""
    B, T = segments.shape
    if kind == FLEX:
        def same_segment_causal(b, h, q, k):
            return (segments[b, q] == segments[b, k]) & (q >= k)
        return create_block_mask(same_segment_causal, B, None, T, T, device=segments.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def is_block_mask(mask) -> bool:
    return bool(BlockMask) and isinstance(mask, BlockMask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H_kv, S, D] under a mask from `build`."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if not is_block_mask(mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **gqa)
    global _compiled_flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # CPU: eager (forward only, unfused), what the tests compare with the dense mask; inside a compiled
        # block (model.compile) the block's own compilation fuses it
        return flex_attention(q, k, v, block_mask=mask, **gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, **gqa)
