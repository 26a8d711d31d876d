"""The Llama decoder: parity with HF LlamaForCausalLM, the HF adapter, generation, init, FLOPs, training."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import ModelConfig
from pipeline.data.batching import IGNORE_INDEX
from pipeline.hf.llama import (
    from_hf_state_dict,
    hf_name,
    model_config_from_hf,
    our_name,
    to_hf_config,
    to_hf_state_dict,
)
from pipeline.train import attention_mask
from pipeline.train.model import (
    Transformer,
    exact_matmul_flops_per_token,
    flops_per_token,
    generate,
    linear_cross_entropy,
    num_params,
)

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
VOCAB = 300


def tiny_config(**overrides) -> ModelConfig:
    # init_std 0.1 rather than 0.02: peaked attention, so a wrong rotary convention would show in the logits.
    fields = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64,
                  init_std=0.1)
    return ModelConfig(**{**fields, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def hf_twin(model: Transformer) -> LlamaForCausalLM:
    """The same weights in transformers' own Llama, built offline from our exported config."""
    cfg = model.cfg
    # eager: HF's own attention math, independent of the SDPA kernel our model calls.
    hf_config = LlamaConfig(**to_hf_config(cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None),
                            attn_implementation="eager")
    hf = LlamaForCausalLM(hf_config).eval()
    hf_state = to_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:
        # torch lists a tied lm_head.weight as missing; HF files omit it and HF reuses the embedding.
        incompatible = hf.load_state_dict(hf_state, strict=False)
        assert incompatible.missing_keys == ["lm_head.weight"] and not incompatible.unexpected_keys
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    else:
        hf.load_state_dict(hf_state, strict=True)
    return hf


def shifted_labels(idx: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(idx, IGNORE_INDEX)
    labels[:, :-1] = idx[:, 1:]
    return labels


def load_preset(name: str) -> ModelConfig:
    preset = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    del preset["defaults"]
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, {"vocab_size": 32000})
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_and_loss_match_hf_llama(tied):
    model = build(tiny_config(tie_embeddings=tied)).eval()
    hf = hf_twin(model)
    idx = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, (no_logits, loss) = model(idx), model(idx, shifted_labels(idx))
        reference = hf(idx, labels=idx)  # HF shifts labels itself
    assert no_logits is None  # with labels the full logits are never built
    assert logits.shape == (2, 33, VOCAB)
    assert (logits - reference.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - reference.loss.item()) <= 1e-5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_dict_round_trip(tied):
    cfg = tiny_config(tie_embeddings=tied)
    state = build(cfg).state_dict()
    hf_state = to_hf_state_dict(state, cfg)
    assert ("lm_head.weight" in hf_state) is not tied
    back = from_hf_state_dict(hf_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], state[name]) for name in state)
    for name in state:
        assert our_name(hf_name(name)) == name
    Transformer(cfg).load_state_dict(back, strict=True)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="not a Llama weight"):
        hf_name("layers.0.attention.bq.bias")
    with pytest.raises(ValueError, match="not a Llama weight"):
        our_name("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_model_config_round_trips_through_hf_config():
    cfg = tiny_config(tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6)
    assert model_config_from_hf(to_hf_config(cfg)) == ModelConfig(**{**vars(cfg), "name": "hf"})
    # config.json as transformers 5 writes it: rope_theta moved into rope_parameters.
    written = LlamaConfig(**to_hf_config(cfg)).to_dict()
    assert model_config_from_hf(written) == ModelConfig(**{**vars(cfg), "name": "hf"})


@pytest.mark.parametrize("change", [{"architectures": ["MistralForCausalLM"]}, {"attention_bias": True},
                                    {"mlp_bias": True}, {"hidden_act": "gelu"},
                                    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}])
def test_unsupported_hf_configs_are_rejected(change):
    with pytest.raises(ValueError):
        model_config_from_hf({**to_hf_config(tiny_config()), **change})


def test_vocab_size_is_required():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelConfig())


def greedy_without_cache(model: Transformer, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        next_id = model(idx)[:, -1].argmax(dim=-1)
        idx = torch.cat([idx, next_id[:, None]], dim=1)
    return idx


def test_greedy_generation_with_cache_matches_recompute_and_hf():
    model = build(tiny_config()).eval()
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, max_new_tokens=12)
    with torch.no_grad():
        assert torch.equal(cached, greedy_without_cache(model, prompt, 12))
        assert torch.equal(cached[:, :13], hf_twin(model).generate(prompt, do_sample=False, max_new_tokens=6,
                                                                   min_new_tokens=6))


def test_chunked_prefill_matches_full_forward():
    model = build(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    with torch.no_grad():
        chunks = [model(idx[:, :8], kv_cache=cache, start_pos=0), model(idx[:, 8:], kv_cache=cache, start_pos=8)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), rtol=0, atol=1e-5)


def test_generation_stops_at_eos_and_tiny_top_p_is_greedy():
    model = build(tiny_config()).eval()
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, max_new_tokens=8)
    nucleus = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, greedy)
    eos = greedy[0, 7].item()  # the third generated token
    stopped = generate(model, prompt, max_new_tokens=8, eos_id=eos)
    first_eos = (greedy[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(stopped, greedy[:, :first_eos + 1])


def test_sampling_is_reproducible_with_a_generator():
    model = build(tiny_config()).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    runs = [generate(model, prompt, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_causality():
    model = build(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    changed = idx.clone()
    changed[0, 15] = (idx[0, 15] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_segments_see_only_themselves(checkpointing):
    """Two examples packed in one row with their segment ids (and padding) give each example the logits it
    has alone, at position 0: attention stays inside a segment and rotary embeddings are relative.
    Without the segments the second example's logits change (it attends to the first)."""
    model = build(tiny_config(activation_checkpointing=checkpointing)).eval()
    generator = torch.Generator().manual_seed(9)
    first, second = torch.randint(0, VOCAB, (1, 7), generator=generator), torch.randint(0, VOCAB, (1, 9), generator=generator)
    packed = torch.cat([first, second, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4])
    with torch.no_grad():
        logits = model(packed, mask=attention_mask.build(segments, attention_mask.DENSE))
        torch.testing.assert_close(logits[:, :7], model(first), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, 7:16], model(second), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(packed)[:, 7:16], model(second), atol=1e-3)


def test_scaled_init_and_determinism():
    cfg = tiny_config(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=688, init_std=0.02)
    model = build(cfg, seed=7)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for layer in model.layers:
        assert layer.attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert layer.feed_forward.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(layer.ffn_norm.weight, torch.ones(256))
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    again = build(cfg, seed=7).state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_num_params_counts_the_module(tied):
    cfg = tiny_config(tie_embeddings=tied)
    model = Transformer(cfg)
    assert num_params(cfg, exclude_embedding=False) == sum(p.numel() for p in model.parameters())
    matmul_head = VOCAB * cfg.dim
    expected = sum(p.numel() for p in model.parameters()) - (0 if tied else matmul_head)
    assert num_params(cfg, exclude_embedding=True) == expected


def test_flops_per_token_125m_by_hand():
    cfg = load_preset("125m")
    d, L, H, Q, V, F, T = 768, 12, 12, 64, 32000, 2048, 1024
    per_layer = 4 * d * d + 3 * d * F + 2 * d  # q, k, v, o (no GQA) + SwiGLU + two norms
    n = L * per_layer + d + V * d  # + final norm + output head; the embedding lookup is left out
    assert n == 109_529_856
    assert flops_per_token(cfg, T) == 6 * n + 12 * L * H * Q * T == 770_425_344
    matmul_n = n - (2 * L + 1) * d
    assert exact_matmul_flops_per_token(cfg, T) == 6 * matmul_n + 6 * L * H * Q * (T + 1)


@pytest.mark.parametrize("name, low, high", [("125m", 100e6, 170e6), ("350m", 300e6, 450e6),
                                             ("1b", 1.0e9, 1.2e9), ("7b", 6.5e9, 7.0e9)])
def test_preset_sizes(name, low, high):
    cfg = load_preset(name)
    assert cfg.name == name
    assert low <= num_params(cfg, exclude_embedding=False) <= high


def test_presets_match_published_models():
    assert num_params(load_preset("1b"), exclude_embedding=False) == 1_100_048_384  # TinyLlama-1.1B
    assert num_params(load_preset("7b"), exclude_embedding=False) == 6_738_415_616  # Llama-2-7B


def test_activation_checkpointing_gives_same_loss_and_grads():
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    results = []
    for checkpointing in (False, True):
        model = build(tiny_config(activation_checkpointing=checkpointing)).train()
        _, loss = model(idx, shifted_labels(idx))
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad)


def test_tiny_model_overfits_a_batch():
    model = build(tiny_config(init_std=0.02)).train()
    idx = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9))
    labels = shifted_labels(idx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        _, loss = model(idx, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- the chunked loss ----------------------------------------------------------------------------------------
def full_logits_loss(model: Transformer, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as the model computed it before chunking: the whole [B, T, vocab] logits, in fp32."""
    return F.cross_entropy(model(idx).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def labels_with_ignored(idx: torch.Tensor, seed: int) -> torch.Tensor:
    drop = torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    return shifted_labels(idx).masked_fill(drop, IGNORE_INDEX)


def loss_and_grads(model: Transformer, loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    (0.37 * loss).backward()  # a grad_output other than 1, as the scaling of gradient accumulation gives
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters()}


def max_differences(model, idx, labels) -> tuple[float, float, float]:
    """|loss - full-logits loss|, and the largest gradient difference, absolute and relative to that
    parameter's largest gradient."""
    loss, grads = loss_and_grads(model, lambda: model(idx, labels)[1])
    ref_loss, ref_grads = loss_and_grads(model, lambda: full_logits_loss(model, idx, labels))
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    grad_abs = max((grads[k] - g).abs().max().item() for k, g in ref_grads.items())
    grad_rel = max(((grads[k] - g).abs().max() / g.abs().max()).item() for k, g in ref_grads.items())
    return (loss - ref_loss).abs().item(), grad_abs, grad_rel


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [7, 66, 1024])  # 7 does not divide the 2 × 33 positions; 66 is all of them
def test_chunked_loss_and_grads_equal_full_logits(tied, chunk):
    model = build(tiny_config(tie_embeddings=tied)).train()
    model.output.chunk_tokens = chunk
    idx = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(11))
    labels = labels_with_ignored(idx, seed=12)
    assert 5 < (labels == IGNORE_INDEX).sum() < labels.numel() - 5
    loss_diff, grad_abs, grad_rel = max_differences(model, idx, labels)
    assert loss_diff <= 2e-6 and grad_rel <= 1e-5, (loss_diff, grad_abs, grad_rel)


@pytest.mark.parametrize("scheme", ["autocast", "bf16 params"])
def test_chunked_loss_in_bf16(scheme):
    """bf16 as pretraining runs it (DeepSpeed's bf16 params, or fp32 params under autocast): the chunked loss
    casts the logits' gradient to bf16 where the backward of .float() does, so it stays as close."""
    model = build(tiny_config()).train()
    model.output.chunk_tokens = 7
    if scheme == "bf16 params":
        model = model.to(torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(13))
    labels = labels_with_ignored(idx, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scheme == "autocast"):
        loss_diff, grad_abs, grad_rel = max_differences(model, idx, labels)
    assert loss_diff <= 1e-2 and grad_rel <= 3e-2, (loss_diff, grad_abs, grad_rel)  # a few bf16 ulps


def test_chunked_loss_without_grad_and_with_every_label_ignored():
    model = build(tiny_config()).train()
    model.output.chunk_tokens = 5
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(15))
    labels = labels_with_ignored(idx, seed=16)
    with torch.no_grad():
        loss = model(idx, labels)[1]
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, full_logits_loss(model, idx, labels), rtol=1e-6, atol=1e-6)
    # No position counts: NaN, as F.cross_entropy gives (the trainers' non-finite checks catch it), and no gradient.
    ignored = torch.full_like(idx, IGNORE_INDEX)
    loss, grads = loss_and_grads(model, lambda: model(idx, ignored)[1])
    ref_loss, ref_grads = loss_and_grads(model, lambda: full_logits_loss(model, idx, ignored))
    assert loss.isnan() and ref_loss.isnan()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def largest_tensor_made(run) -> int:
    """The most elements of any tensor an op returned while `run()` ran, its backward included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        run()
    return Largest.numel


def test_chunked_loss_never_builds_the_logits_of_all_positions():
    # 4 × 48 positions in chunks of 100, more than dim (64): the largest tensor is a chunk's logits, not the weight.
    vocab, batch, seq = 4096, 4, 48
    model = build(tiny_config(vocab_size=vocab)).train()
    model.output.chunk_tokens = 100
    idx = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(17))
    labels = shifted_labels(idx)
    assert largest_tensor_made(lambda: full_logits_loss(model, idx, labels).backward()) >= batch * seq * vocab
    assert largest_tensor_made(lambda: model(idx, labels)[1].backward()) == 100 * vocab
