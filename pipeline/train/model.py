"""A Llama-architecture decoder, written to be read top to bottom.

Weights map one to one onto HF `LlamaForCausalLM` (see `pipeline.hf.llama`): rotary embeddings use
HF's rotate_half convention and RMSNorm normalizes in fp32 the way LlamaRMSNorm does, so logits
match HF's to float rounding. Compilation and parallelism are applied from outside (`compile_blocks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..data.batching import IGNORE_INDEX
from . import attention_mask

# Positions whose logits the loss holds at once: at vocab 32k one chunk's fp32 logits are 131 MB, where the
# whole [B * T, vocab] would be 4.2 GB at micro batch 16, seq 2048.
LOSS_CHUNK_TOKENS = 1024

# scaled_dot_product_attention takes fewer k/v heads than q heads from torch 2.5 on (enable_gqa);
# older versions get k/v repeated per query head instead.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, cast back, then scale: the order of HF's LlamaRMSNorm, for bf16 parity.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of shape [max_seq_len, head_dim]; both halves of a row hold the same angles."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] pairing dims (i, i + D/2), HF's rotate_half convention."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@dataclass
class KVCache:
    """One layer's keys and values, [B, n_kv_heads, max_len, head_dim], filled in position order."""
    k: torch.Tensor
    v: torch.Tensor

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at start_pos onwards; return all keys and values up to their end."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(start_pos, k, v)

        gqa = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        S = k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if mask is not None:  # packed documents or examples: causal within each (attention_mask.build)
            y = attention_mask.attend(q, k, v, mask, dropout)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, **gqa)
        else:
            # The T queries are the last T of S positions (a cache holds the rest); is_causal would
            # align the mask top-left, so spell it out.
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _chunked_cross_entropy(h, weight, labels, chunk_tokens, grad_h=None, grad_w=None) -> torch.Tensor:
    """The mean loss of linear_cross_entropy over h [N, dim] and labels [N]; when grad_h ([N, dim]) and
    grad_w ([vocab, dim], fp32) are given, also the loss's gradients written into them (grad_w added to).

    Every chunk's fp32 logits go into one buffer and are exponentiated once, in place: the log-sum-exp and
    the gradient's softmax both come from that pass. A fresh [chunk, vocab] tensor for each chunk costs a
    CPU a page fault per 4 KiB, more than the exponentials themselves (bench/loss.py)."""
    valid = labels != IGNORE_INDEX
    count = valid.sum()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    buffer = torch.empty((min(chunk_tokens, h.shape[0]), weight.shape[0]), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        counted = valid[rows]
        target = labels[rows].masked_fill(~counted, 0)[:, None]
        logits = buffer[:len(counted)]
        if h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
            torch.mm(h[rows], weight.t(), out=logits)
            dtype = torch.float32
        else:  # a bf16/fp16 matmul (by dtype or autocast), an fp32 softmax: F.linear(...).float()
            product = F.linear(h[rows], weight)
            logits.copy_(product)
            dtype = product.dtype
        picked = logits.gather(1, target)
        peak = logits.amax(dim=-1, keepdim=True)  # the log-sum-exp as torch.logsumexp computes it
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += torch.where(counted, (norm.log() + peak - picked).squeeze(1), 0.0).sum()
        if grad_h is None and grad_w is None:
            continue
        # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count on counted rows, 0 on the others;
        # cast to the matmul's dtype as the backward of .float() does.
        grad = exp.div_(norm).scatter_add_(1, target, torch.full_like(target, -1, dtype=exp.dtype))
        grad = grad.mul_(torch.where(counted, 1.0 / count, 0.0)[:, None]).to(dtype)
        if grad_h is not None:
            grad_h[rows] = grad @ weight
        if grad_w is not None:
            grad_w += grad.t() @ h[rows]
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with gradients: the forward computes them chunk by chunk, while each chunk's
    logits exist anyway, so that the backward only scales them and nothing is recomputed."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens):
        needs_h, needs_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if needs_h else None
        # fp32 across chunks: one rounding to the weight's dtype at the end, as a single matmul would do.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        loss = _chunked_cross_entropy(h, weight, labels, chunk_tokens, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=IGNORE_INDEX) for h [..., dim] and
    labels [...]: the fp32 mean over positions whose label is not IGNORE_INDEX (NaN if there are none),
    computed chunk_tokens positions at a time, so that the logits of all positions never exist at once,
    neither in the forward nor in the backward."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, chunk_tokens)
    return _chunked_cross_entropy(h, weight, labels, chunk_tokens)


class LMHead(nn.Linear):
    """The output projection; given labels it returns the loss instead of the logits (linear_cross_entropy).
    The loss is computed inside this module's forward so that ZeRO 3, which gathers a module's
    parameters around its forward, has the weight gathered for it."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)
        self.chunk_tokens = LOSS_CHUNK_TOKENS

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels, self.chunk_tokens)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is None: set it (normally from the tokenizer) before building")
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(f"need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head dim; got "
                             f"dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}")
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.n_heads
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Recomputed by init_weights, never saved: they follow from the config.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Scaled normal init and the rotary tables; call again after materializing a meta-device model."""
        cfg = self.cfg
        self.rope_cos, self.rope_sin = rotary_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta,
                                                     device=self.rope_cos.device)
        # Each residual branch's output projection is scaled down so the residual stream's variance
        # does not grow with depth (GPT-2 / Megatron).
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        nn.init.normal_(self.output.weight, std=cfg.init_std)
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                nn.init.normal_(linear.weight, std=cfg.init_std)
            for linear in (attn.wo, ffn.w2):
                nn.init.normal_(linear.weight, std=residual_std)
            nn.init.ones_(layer.attention_norm.weight)
            nn.init.ones_(layer.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)

    def new_kv_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """An empty cache for `forward(..., kv_cache=)`, in the dtype and on the device of the weights."""
        weight = self.tok_embeddings.weight
        shape = (batch_size, self.cfg.n_kv_heads, max_len, self.head_dim)
        return [KVCache(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.layers]

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None,
                kv_cache: list[KVCache] | None = None, start_pos: int = 0, mask=None):
        """Logits [B, T, vocab] for every position of idx [B, T]; with labels, (None, loss).

        labels[b, t] is the token that should follow idx[b, t] (already shifted, nanoGPT style);
        IGNORE_INDEX positions carry no loss. The loss is the fp32 mean cross-entropy over the rest,
        computed a chunk of positions at a time (LMHead): the full logits are never built, so none are
        returned with it.
        With kv_cache, idx holds positions start_pos .. start_pos + T - 1 and the cache the earlier ones.
        mask (packed documents or fine-tuning examples): `attention_mask.build(segments, kind)`, made once per
        batch; a position attends only to earlier positions of its own segment. Rotary embeddings are
        relative, so positions need not restart at each segment.
        """
        T = idx.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        recompute = self.cfg.activation_checkpointing and self.training and kv_cache is None
        h = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            if recompute:
                h = checkpoint(layer, h, cos, sin, None, 0, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, None if kv_cache is None else kv_cache[i], start_pos, mask)
        if labels is None:
            return self.output(self.norm(h))
        return None, self.output(self.norm(h), labels)


def compile_blocks(model: Transformer) -> None:
    """torch.compile every block in place (for cfg.compile), before wrapping for parallelism.

    Per block: all layers share one compiled graph, so compile time does not grow with depth.
    Module.compile keeps parameter names, so checkpoints and the HF adapter see the same keys.
    """
    for layer in model.layers:
        layer.compile()


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [B, vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (the top token always stays).
    outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside_nucleus, 0.0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
             stop_early: bool = True) -> torch.Tensor:
    """Continue each row of prompt_ids [B, T] using a KV cache; returns [B, T + up to max_new_tokens].

    A row that emits eos_id is padded with eos_id; generation stops once every row has, unless
    `stop_early=False`: then it always makes max_new_tokens forward calls, as every rank of a ZeRO 3 model
    must (it gathers parameters collectively). no_grad rather than inference_mode: ZeRO 3 keeps small
    parameters gathered across calls, and tensors made in inference mode would break the next backward.
    """
    batch_size, prompt_len = prompt_ids.shape
    total_len = prompt_len + max_new_tokens
    kv_cache = model.new_kv_cache(batch_size, total_len)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    ids = prompt_ids
    logits = model(ids, kv_cache=kv_cache, start_pos=0)[:, -1]
    for _ in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished, eos_id)
            finished |= next_id == eos_id
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if ids.shape[1] == total_len or (stop_early and finished.all()):
            break
        logits = model(next_id[:, None], kv_cache=kv_cache, start_pos=ids.shape[1] - 1)[:, -1]
    return ids


def num_params(cfg: ModelConfig, exclude_embedding: bool = True) -> int:
    """Parameter count of Transformer(cfg), from the config alone.

    exclude_embedding drops the token-embedding lookup table but keeps the output head, which is a
    matmul; with tied embeddings the shared matrix is counted once, as the head.
    """
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size is None: set it before counting parameters")
    head_dim = cfg.dim // cfg.n_heads
    attention = 2 * cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * cfg.n_kv_heads * head_dim
    feed_forward = 3 * cfg.dim * cfg.ffn_dim
    per_layer = attention + feed_forward + 2 * cfg.dim  # + the two norms
    head = cfg.vocab_size * cfg.dim
    embedding = 0 if exclude_embedding or cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_layers * per_layer + cfg.dim + head + embedding


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token by the PaLM formula (Chowdhery et al. 2022, appendix B): 6N + 12·L·H·Q·T.

    N = num_params(cfg, exclude_embedding=True): every parameter but the embedding lookup, the output
    head included (once when tied); L = n_layers, H = n_heads, Q = head dim, T = seq_len. The use for
    MFU: achieved tokens/s * flops_per_token / peak FLOP/s.
    """
    head_dim = cfg.dim // cfg.n_heads
    return 6 * num_params(cfg, exclude_embedding=True) + 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len


def exact_matmul_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of every matmul, averaged over a causal sequence of seq_len tokens.

    Forward: 2 FLOPs per weight of each linear layer, plus the attention scores (QK^T) and the weighted
    sum of values, each 2·Q FLOPs per head for each of the (T + 1) / 2 positions a token attends to on
    average; backward costs twice the forward. The result is 6·N_matmul + 6·L·H·Q·(T + 1): versus
    `flops_per_token` it leaves out the norm weights and counts attention only over the unmasked
    (causal) half, which is what a causal kernel must do. Elementwise ops are not counted by either.
    """
    head_dim = cfg.dim // cfg.n_heads
    norm_weights = (2 * cfg.n_layers + 1) * cfg.dim
    matmul_weights = num_params(cfg, exclude_embedding=True) - norm_weights
    # Two matmuls (scores, values) * 2 FLOPs * H * Q * (T + 1) / 2 attended positions.
    attention_per_layer = 2 * cfg.n_heads * head_dim * (seq_len + 1)
    return 3 * (2 * matmul_weights + cfg.n_layers * attention_per_layer)
