"""Document masking (train.document_mask) and packed fine-tuning (finetune.pack_isolate): one mechanism,
pipeline/train/attention_mask.py, on both of its mask kinds."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import TINY, error_lines, fresh_run, records, run_config_checks, run_on_ranks

from pipeline.config import ModelConfig
from pipeline.data.stream import PretrainLoader, TokenStream, document_segments
from pipeline.data.vocab import EOS_ID
from pipeline.train import attention_mask
from pipeline.train.model import Transformer
from pipeline.train.trainer import Trainer

VOCAB = 300
KINDS = [attention_mask.DENSE, attention_mask.FLEX]  # flex: eager FlexAttention, forward only on CPU


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64,
                  init_std=0.1)  # peaked attention: a leak across documents shows in the logits
    return Transformer(ModelConfig(**{**fields, **overrides})).eval()


def documents(lengths: list[int], seed: int = 3) -> list[torch.Tensor]:
    """Documents of random non-EOS tokens, each ending with EOS, as the shards hold them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(EOS_ID + 2, VOCAB, (n - 1,), generator=g), torch.tensor([EOS_ID])])
            for n in lengths]


def test_segments_cut_after_each_eos():
    inputs = np.array([[5, 6, EOS_ID, 7, EOS_ID, EOS_ID, 8], [EOS_ID, 9, 9, 9, 9, 9, 9]])
    assert document_segments(inputs, EOS_ID).tolist() == [[0, 0, 0, 1, 1, 2, 3],
                                                                       [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("kind", KINDS)
def test_document_masking_gives_each_document_its_logits_alone(kind):
    """Three documents packed in a window (the last cut off by the window's end), segments from their EOS
    positions: each document's logits are those of the document run alone, from position 0. Without the
    mask the later documents' logits change (they attend to the earlier ones)."""
    model = tiny_model()
    docs = documents([9, 14, 20])
    window = torch.cat(docs)[None, :40]
    segments = torch.from_numpy(document_segments(window.numpy(), EOS_ID))
    mask = attention_mask.build(segments, kind)
    assert attention_mask.is_block_mask(mask) == (kind == attention_mask.FLEX)
    with torch.no_grad():
        logits = model(window, mask=mask)
        start = 0
        for doc in docs:
            alone = model(doc[None, :40 - start])
            torch.testing.assert_close(logits[:, start:start + doc.numel()], alone, atol=1e-5, rtol=1e-5)
            start += doc.numel()
        assert not torch.allclose(model(window)[:, 9:23], model(docs[1][None]), atol=1e-3)


def test_flex_and_dense_masks_agree_with_padding_and_gqa():
    """Fine-tuning's segments (-1 for padding) on both kinds, with grouped-query attention."""
    model = tiny_model(n_heads=8, n_kv_heads=2)
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 10 + [1] * 30 + [-1] * 8, [0] * 48])
    with torch.no_grad():
        dense, flex = (model(idx, mask=attention_mask.build(segments, kind)) for kind in KINDS)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_the_kind_follows_the_device_and_says_why():
    kind, why = attention_mask.choose_kind(torch.device("cpu"))
    assert kind == attention_mask.DENSE and "no backward on cpu" in why
    assert attention_mask.choose_kind(torch.device("cuda"))[0] == attention_mask.FLEX
    kind, why = attention_mask.choose_kind(torch.device("cuda"), dropout=0.1)
    assert kind == attention_mask.DENSE and "dropout" in why


def fake_stream(tokens: np.ndarray) -> TokenStream:
    shard = types.SimpleNamespace(tokens=tokens, num_tokens=tokens.size, dtype=tokens.dtype)
    return TokenStream([shard], VOCAB, EOS_ID, {"split": "train", "num_tokens": tokens.size})


@pytest.mark.parametrize("source", ["pretrain", "finetune"])
def test_pretraining_and_packed_finetuning_share_one_mask(source, monkeypatch):
    """The trainer's forward turns a batch's segments into one mask with attention_mask.build, whichever
    stage made the batch: PretrainLoader with document_mask (segments from EOS) or packed fine-tuning."""
    if source == "pretrain":
        tokens = torch.cat(documents([5, 11, 3, 30, 7, 9, 12, 40])).numpy().astype(np.uint16)
        loader = PretrainLoader(fake_stream(tokens), 16, 2, 2, seed=0, document_mask=True)
        batch = loader.next_global_batch()[0]
        inputs, _, segments = batch
        assert torch.equal(segments, torch.from_numpy(document_segments(inputs.numpy(), EOS_ID)))
        no_mask = PretrainLoader(fake_stream(tokens), 16, 2, 2, seed=0).next_global_batch()[0]
        assert len(no_mask) == 2 and torch.equal(no_mask[0], inputs)
    else:
        inputs = torch.randint(0, VOCAB, (2, 16))
        batch = (inputs, inputs, torch.tensor([[0] * 6 + [1] * 7 + [-1] * 3, [0] * 16]))
    built, seen = [], []
    real_build = attention_mask.build

    def counting_build(segments, kind):
        built.append(kind)
        return real_build(segments, kind)

    monkeypatch.setattr(attention_mask, "build", counting_build)
    model = tiny_model()
    trainer = types.SimpleNamespace(device=torch.device("cpu"), mask_kind=attention_mask.DENSE, _mask_why=None,
                                    engine=lambda idx, labels, mask: seen.append(mask) or model(idx, labels, mask=mask))
    with torch.no_grad():
        loss = Trainer._forward(trainer, batch)
        _, reference = model(batch[0], batch[1], mask=real_build(batch[2], attention_mask.DENSE))
    assert built == [attention_mask.DENSE] and seen[0].shape == (2, 1, 16, 16)
    torch.testing.assert_close(loss, reference)


def test_finetune_document_mask_is_refused():
    proc = run_config_checks("finetune.document_mask=true")
    assert proc.returncode != 0 and "pack_isolate" in error_lines(proc)[0], proc.stderr


@pytest.mark.slow
def test_two_ranks_pretrain_with_document_mask(tmp_path, data_run):
    run_dir = fresh_run(data_run, tmp_path)
    log = run_on_ranks(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "train.document_mask=true",
                       "train.max_steps=12", "train.eval_interval=12", "launch.nproc_per_node=2")
    assert "attention masks: dense (FlexAttention has no backward on cpu" in log, log[-3000:]
    losses = records(run_dir)
    assert sorted(losses) == list(range(1, 13)) and np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5
    assert np.isfinite(records(run_dir, "val_loss")[12])
