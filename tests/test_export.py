"""The export stage: DeepSpeed checkpoints of every ZeRO stage → HF LlamaForCausalLM folders that
transformers loads offline, with logits, greedy generation, token ids and chat rendering equal to ours."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download

import pytest
import torch
from conftest import ADVERSARIAL, ROOT, ZERO_STEPS

from pipeline.checkpoint.store import RECORD, find_resumable, tag_for
from pipeline.config import ExportConfig, ModelConfig, PipelineConfig
from pipeline.data.chat import render
from pipeline.data.vocab import load_tokenizer
from pipeline.errors import PipelineError
from pipeline.hf.llama import expected_shapes, from_hf_state_dict
from pipeline.layout import RunLayout
from pipeline.stages import export as ex
from pipeline.train.model import Transformer, generate

MORE_TEXT = [
    "\t\t\tdeep\n\t\t\t\tdeeper\n", " leading space", "  two leading spaces", "trailing space ", "a  b   c    d     e",
    "line1\nline2\n\nline4\n\n\n", "中文 mixed with English 和 spaces 、。", "🙂🙂🙂 👍🏽 🇯🇵", "x = 12345 + 0.5e-10 - 007",
    "<|im_start|><|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n", "▁ a literal ▁▁ lower block",
    "<0x41> is not a byte piece", "\u200b zero width \ufeff BOM", "\x00 null \x7f del", "é vs e\u0301 (NFC vs NFD)",
    "def f():\n    return {'a': [1, 2]}\n" * 3, "    \n\t \n \t", "if x:\n\tpass\nelse:\n        pass\n",
    "<s>hello</s>", "<unk>", "<<s>>", "</s></s>",
]


def export(run_dir: Path, source: str = "pretrain", **overrides) -> Path:
    return ex.export_model(ExportConfig(**{"dtype": "float32", **overrides}), ModelConfig(), RunLayout.of(run_dir), source)


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def our_model(model_cfg: ModelConfig, state: dict) -> Transformer:
    model = Transformer(model_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def model_config(run_dir: Path) -> ModelConfig:
    _, record = find_resumable(run_dir / "pretrain" / "checkpoints")
    sp = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    return ex.model_config_for(ModelConfig(), record, sp.get_piece_size())


def exported_state(folder: Path, model_cfg: ModelConfig) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return from_hf_state_dict(state, model_cfg)


def assert_same_logits(ours: Transformer, hf, vocab_size: int, tolerance: float = 1e-4) -> None:
    ids = torch.randint(4, vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= tolerance, diff


def assert_same_greedy_generation(ours: Transformer, hf, sp) -> None:
    stops = {sp.eos_id(), sp.piece_to_id("<|im_end|>")}
    for text in ("The baker walked", "def item(x):\n", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"):
        prompt = torch.tensor([sp.encode(text)])
        mine = generate(ours, prompt, max_new_tokens=24)[0, prompt.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(mine) if t in stops), None)
        mine = mine if stop is None else mine[:stop + 1]  # HF stops at generation_config's eos ids
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=24)[0, prompt.shape[1]:].tolist()
        assert theirs == mine, (text, mine, theirs)


# -- DeepSpeed-trained checkpoints (slow: conftest's zero_run, trained on 2 CPU ranks) ------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, zero_run):
    """trained(zero, precision): a copy (exports are written into it) of conftest's zero_run, the run that
    test_pretrain checks the training of: ZERO_STEPS steps, one checkpoint at the last."""
    runs = {}

    def get(zero: str, precision: str) -> Path:
        if (zero, precision) not in runs:
            runs[zero, precision] = Path(shutil.copytree(zero_run(zero, precision),
                                                         tmp_path_factory.mktemp(f"{zero}-{precision}") / "run"))
        return runs[zero, precision]

    return get


def reference_state(run_dir: Path) -> tuple[dict, bool]:
    """The checkpoint's weights consolidated independently: DeepSpeed's zero_to_fp32 (ZeRO 1-3) or the
    module (ZeRO 0: what export takes, bf16 after bf16 training); bool: whether they are what export
    should have written (not for bf16 ZeRO 1, whose BF16_Optimizer checkpoints zero_to_fp32 rejects:
    then the bf16 module, which the exported fp32 masters must round to)."""
    folder, _ = find_resumable(run_dir / "pretrain" / "checkpoints")
    module = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"] \
        if (folder / "mp_rank_00_model_states.pt").is_file() else None
    if not list(folder.glob("*_optim_states.pt")):
        return module, True
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name), True
    except ValueError:
        return module, False


@pytest.mark.slow
def test_zero3_export_matches_our_model(trained):
    run_dir = trained("zero3", "fp32")
    folder = export(run_dir)
    model_cfg = model_config(run_dir)
    sp = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    state, exact = reference_state(run_dir)
    assert exact
    ours, hf = our_model(model_cfg, state), hf_model(folder)
    assert_same_logits(ours, hf, model_cfg.vocab_size)
    assert_same_greedy_generation(ours, hf, sp)

    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    card = (folder / "README.md").read_text()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_loss = next(r["loss"] for r in reversed(last) if r.get("loss") is not None)
    from pipeline.fsutil import sha256_file

    steps = ZERO_STEPS
    for expected in (f"step_{steps:08d} (step {steps})", f"{steps * 8 * 64:,}",
                     sha256_file(run_dir / "shards" / "manifest.json"), f"{final_loss:.4f} (step {steps})",
                     "deepspeed:", "stage: 3"):
        assert expected in card, expected


@pytest.mark.slow
def test_tokenizer_matches_sentencepiece_and_chat_template(trained):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    run_dir = trained("zero3", "fp32")
    folder = run_dir / "export" / "pretrain"
    if not folder.is_dir():
        export(run_dir)
    sp = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    hf_tok = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ADVERSARIAL + MORE_TEXT:
        ids = sp.encode(text)
        assert hf_tok(text)["input_ids"] == ids, (text, sp.encode(text, out_type=str),
                                                  hf_tok.convert_ids_to_tokens(hf_tok(text)["input_ids"]))
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        assert hf_tok.decode(ids) == sp.decode(ids), text
        assert raw.decode(ids, skip_special_tokens=False) == sp.decode(ids), text
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2, 3)
    im_end = sp.piece_to_id("<|im_end|>")
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") == im_end
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [2, im_end]

    conversations = [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "def f():\n\treturn 1"},
         {"role": "assistant", "content": " 中文 🙂 <s> 42"}, {"role": "user", "content": ""}],
    ]
    for messages in conversations:
        for prompt in (False, True):
            text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert text == render(messages, add_generation_prompt=prompt)[0]
            ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == sp.encode(text)


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [("zero0", "fp32"), ("zero0", "bf16"), ("zero1", "bf16"),
                                            ("zero2", "bf16"), ("zero3_offload", "bf16")])
def test_other_zero_stages_export_and_load(trained, zero, precision):
    run_dir = trained(zero, precision)
    folder = export(run_dir)
    model_cfg = model_config(run_dir)
    hf = hf_model(folder)
    state, exact = reference_state(run_dir)
    if exact:
        assert_same_logits(our_model(model_cfg, state), hf, model_cfg.vocab_size)
    else:  # the fp32 masters we exported round to the bf16 weights the model trained with
        exported = exported_state(folder, model_cfg)
        for name, tensor in state.items():
            assert torch.equal(exported[name].to(tensor.dtype), tensor), name
        assert any(not torch.equal(exported[n], state[n].float()) for n in state)  # more than bf16 precision
        assert_same_logits(our_model(model_cfg, exported), hf, model_cfg.vocab_size)


@pytest.mark.slow
def test_sharded_export_has_an_index_and_loads(trained, tmp_path):
    run_dir = trained("zero2", "bf16")
    whole = hf_model(export(run_dir))
    folder = export(run_dir, max_shard_size_gb=150e-6)  # 150 kB: the tiny model spans several files
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)
    sharded = hf_model(folder)
    ids = torch.randint(4, whole.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(sharded(ids).logits, whole(ids).logits)


def loads(folder: Path) -> bool:
    try:
        hf_model(folder)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_interrupted_export_never_leaves_a_folder_that_loads(trained, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained("zero2", "bf16"), run_dir, ignore=shutil.ignore_patterns("export"))
    target = run_dir / "export" / "pretrain"

    def failing(*args, **kwargs):
        raise OSError("disk full")

    # 1. an exception after the weights: nothing is left at all
    monkeypatch.setattr(ex, "write_tokenizer", failing)
    with pytest.raises(OSError, match="disk full"):
        export(run_dir)
    monkeypatch.undo()
    assert not target.exists() and not list(target.parent.glob("pretrain.tmp-*"))

    # 2. the process dies halfway through the weights: only a staging folder remains, and it does not load
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
            "import pipeline.stages.export as ex, pipeline.hf.llama as hf\nfrom pipeline.config import ExportConfig, ModelConfig\n"
            "from pipeline.layout import RunLayout\nreal = hf.write_safetensors\n"
            "def dying(path, entries, dtype):\n    real(path, entries[:2], dtype)\n    os._exit(9)\n"
            "hf.write_safetensors = dying\n"
            f"ex.export_model(ExportConfig(dtype='float32'), ModelConfig(), RunLayout.of(Path({str(run_dir)!r})), 'pretrain')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    leftovers = list(target.parent.glob("pretrain.tmp-*"))
    assert not target.exists() and len(leftovers) == 1 and not loads(leftovers[0])

    # 3. a rerun succeeds and clears the leftover
    export(run_dir)
    assert loads(target) and not list(target.parent.glob("pretrain.tmp-*"))

    # 4. a failed re-export keeps the previous complete export as it was
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr(ex, "write_configs", failing)
    with pytest.raises(OSError):
        export(run_dir, dtype="bfloat16")
    assert (target / "model.safetensors").read_bytes() == before and loads(target)


@pytest.mark.slow
def test_run_export_all_and_missing_checkpoints(trained, data_run):
    run_dir = trained("zero2", "bf16")
    files = ex.export_sources(ExportConfig(source="all"), ModelConfig(), RunLayout.of(run_dir))
    assert {p.parent for p in files} == {run_dir / "export" / "pretrain"}  # no finetune checkpoints
    assert all(p.is_file() for p in files) and any(p.name == "model.safetensors" for p in files)
    with pytest.raises(PipelineError, match="no complete finetune checkpoint"):
        ex.export_model(ExportConfig(), ModelConfig(), RunLayout.of(run_dir), "finetune")
    with pytest.raises(PipelineError, match="no complete pretrain or finetune checkpoint"):
        ex.export_sources(ExportConfig(source="all"), ModelConfig(), RunLayout.of(data_run))


# -- a hand-made ZeRO 0 checkpoint (fast) ---------------------------------------------------------------------
def write_stage0_checkpoint(run_dir: Path, model: Transformer, record_model: bool = True) -> None:
    """The files pipeline.checkpoint.store writes for a ZeRO 0 run, with the model's weights."""
    folder = run_dir / "pretrain" / "checkpoints" / tag_for(7)
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    trainer_state = {"step": 7, "tokens_seen": 7000, "loader": None}
    if record_model:
        trainer_state["model"] = asdict(model.cfg)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / RECORD).write_text(json.dumps({"step": 7, "world_size": 1, "files": files,
                                             "trainer_state": trainer_state}))


@pytest.fixture
def tied_run(small_run, tmp_path) -> tuple[Path, Transformer]:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run / "tokenizer", run_dir / "tokenizer")
    vocab = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model").get_piece_size()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="tied", vocab_size=vocab, dim=48, n_layers=3, n_heads=6, n_kv_heads=2,
                                    ffn_dim=128, max_seq_len=128, rope_theta=500000.0, tie_embeddings=True))
    with torch.no_grad():  # norms away from 1 so that a dropped or swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    write_stage0_checkpoint(run_dir, model)
    return run_dir, model.eval()


def test_tied_embeddings_and_rope_theta_survive_the_export(tied_run):
    from safetensors import safe_open
    from transformers import AutoConfig

    run_dir, model = tied_run
    folder = export(run_dir)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    config = AutoConfig.from_pretrained(folder)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 500000.0
    hf = hf_model(folder)
    assert_same_logits(model, hf, model.cfg.vocab_size)
    card = (folder / "README.md").read_text()
    assert "step_00000007 (step 7)" in card and "7,000" in card and "not logged" in card


def test_bfloat16_export_is_the_rounded_weights(tied_run):
    run_dir, model = tied_run
    folder = export(run_dir, dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    exported = exported_state(folder, model.cfg)
    for name, tensor in model.state_dict().items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.bfloat16()), name


def test_model_config_falls_back_to_cfg_model_and_mismatches_are_one_line_errors(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run / "tokenizer", run_dir / "tokenizer")
    vocab = load_tokenizer(run_dir / "tokenizer" / "tokenizer.model").get_piece_size()
    write_stage0_checkpoint(run_dir, Transformer(ModelConfig(vocab_size=vocab)), record_model=False)
    assert loads(export(run_dir))  # cfg.model (tiny) with the tokenizer's vocabulary
    wrong = ModelConfig(dim=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(PipelineError, match="does not match the model config") as error:
        ex.export_model(ExportConfig(dtype="float32"), wrong, RunLayout.of(run_dir), "pretrain")
    assert "\n" not in str(error.value)
    with pytest.raises(PipelineError, match="no complete finetune checkpoint"):
        ex.export_model(ExportConfig(), ModelConfig(), RunLayout.of(run_dir), "finetune")


def test_the_model_card_redacts_secrets():
    config = {"logging": {"wandb": {"api_key": "0123456789abcdef0123456789abcdef", "entity": "team",
                                    "tags": ["hf_abcdefghijklmnopqrstu", "baseline"]}},
              "tokenizer": {"path": "/data/tok.model"}, "auth_token": "x", "run_dir": "runs/a"}
    redacted = ex.redact(config)
    assert redacted["logging"]["wandb"] == {"api_key": "<redacted>", "entity": "team",
                                            "tags": ["<redacted>", "baseline"]}
    assert redacted["tokenizer"] == {"path": "/data/tok.model"} and redacted["auth_token"] == "<redacted>"
    assert redacted["run_dir"] == "runs/a"


def test_expected_shapes_are_the_model_state_dict():
    for cfg in (ModelConfig(vocab_size=300), ModelConfig(vocab_size=77, dim=48, n_layers=3, n_heads=6, n_kv_heads=2,
                                                          ffn_dim=100, tie_embeddings=True)):
        assert expected_shapes(cfg) == {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
