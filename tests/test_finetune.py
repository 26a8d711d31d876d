"""The finetune stage: SFT records → masked ChatML sequences, packing, the loader, bad input, and end to end
(pretrain the tiny model on the built-in world, fine-tune it, exact match before < after). The pretrained run
is conftest's builtin_pretrained (test_pretrain checks its pretraining); the fine-tunes run on 2 ranks
without the CLI (run_on_ranks). Bad SFT input through a run is in test_bad_inputs.py."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUILTIN, BUILTIN_STEPS, mixed_documents, run_in_process, run_on_ranks, write_jsonl

from pipeline.data import sft as S
from pipeline.data.chat import IM_END, render
from pipeline.errors import PipelineError

# -- a small tokenizer ----------------------------------------------------------------------------

SENTENCES = ["Where does Kakel Famevu live? Kakel Famevu lives in Vathbury, on the river Tosh.",
             "What is the capital of France? The capital of France is Paris.",
             "Translate to French: good morning. Bonjour. Name three colours: red, green and blue.",
             "The answer is 42 and the year was 1961. 中文 and 🙂 emoji, tabs\tand  spaces."]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    from pipeline.config import DataConfig, TokenizerConfig
    from pipeline.data.corpus import Corpus
    from pipeline.data.vocab import load_tokenizer
    from pipeline.stages.tokenize import train_tokenizer

    folder = tmp_path_factory.mktemp("sp")
    docs = mixed_documents(200) + SENTENCES * 30
    corpus = Corpus([write_jsonl(folder / "docs.jsonl", [{"text": d} for d in docs])], DataConfig(source="files"))
    train_tokenizer(corpus, TokenizerConfig(vocab_size=400), folder / "tokenizer.model", seed=0)
    return load_tokenizer(folder / "tokenizer.model")


SHAPES = {
    "prompt_response": ({"prompt": "Where does Kakel Famevu live?", "response": "Vathbury"},
                        ["Vathbury"]),
    "alpaca_with_input": ({"instruction": "Translate to French:", "input": "good morning", "output": " Bonjour 🙂"},
                          [" Bonjour 🙂"]),
    "alpaca_without_input": ({"instruction": "Name three colours.", "input": "", "output": "red, green and blue\n"},
                             ["red, green and blue\n"]),
    "chat": ({"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris"},
                           {"role": "user", "content": "And the answer to everything? 中文"},
                           {"role": "assistant", "content": "42, in 1961 中文"}]},
             ["Paris", "42, in 1961 中文"]),
}


def conversations(tmp_path: Path, records: list[dict], name: str = "sft.jsonl") -> list[S.Conversation]:
    return S.load_conversations([write_jsonl(tmp_path / name, records)])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prompt_tokens_carry_no_loss(tmp_path, sp, shape):
    """The positions with a label decode to exactly the assistant turns, each with its <|im_end|>; the ids
    are the whole rendered text encoded at once, and labels are the next input token."""
    record, answers = SHAPES[shape]
    (conversation,) = conversations(tmp_path, [record])
    for pack in (False, True):
        data = S.SFTSequences([conversation], sp, seq_len=128, pack=pack)
        inputs, labels = data.batch(np.arange(len(data)))
        inputs, labels = inputs[0].numpy(), labels[0].numpy()
        n = int(data.lengths[0])
        text, _ = render(conversation.messages)
        assert [*inputs[:n - 1], None] == [*sp.encode(text)[:n - 1], None]
        assert np.array_equal(inputs[1:n - 1][labels[:n - 2] != -100], labels[:n - 2][labels[:n - 2] != -100])
        targets = labels[labels != -100].tolist()
        assert sp.decode(targets) == "".join(" " + a + IM_END for a in answers)
        assert (labels[n - 1:] == -100).all() and (inputs[n - 1:] == data.pad_id).all()


def test_record_shapes_normalise_to_messages(tmp_path):
    msgs = [c.messages for c in conversations(tmp_path, [r for r, _ in SHAPES.values()])]
    assert msgs[0] == [{"role": "user", "content": "Where does Kakel Famevu live?"},
                       {"role": "assistant", "content": "Vathbury"}]
    assert msgs[1][0] == {"role": "user", "content": "Translate to French:\n\ngood morning"}
    assert msgs[2][0] == {"role": "user", "content": "Name three colours."}
    assert [m["role"] for m in msgs[3]] == ["system", "user", "assistant", "user", "assistant"]
    prompt, reference = S.Conversation(msgs[3], "x").question()
    assert reference == "42, in 1961 中文" and prompt == msgs[3][:4]


def test_records_without_an_assistant_turn_or_of_unknown_shape_are_refused(tmp_path):
    cases = [([{"prompt": "a", "response": "b"}, {"prompt": "no answer"}], "record 1 (counting from 0) has no "
                                                                            "assistant turn"),
             ([{"messages": [{"role": "user", "content": "hi"}]}], "record 0 (counting from 0) has no assistant"),
             ([{"instruction": "do it", "input": "x"}], "has no assistant turn"),
             ([{"text": "plain pretraining text"}], "unknown shape"),
             ([{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}], "role in")]
    for i, (records, phrase) in enumerate(cases):
        with pytest.raises(PipelineError) as info:
            conversations(tmp_path, records, f"bad{i}.jsonl")
        assert phrase in str(info.value) and f"bad{i}.jsonl" in str(info.value)
    with pytest.raises(PipelineError, match="accepted shapes.*prompt.*instruction.*messages"):
        conversations(tmp_path, [{"question": "q", "answer": "a"}])


def test_parquet_and_a_seeded_validation_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import FinetuneDataConfig

    records = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    cfg = FinetuneDataConfig(paths=[str(tmp_path / "a.parquet")], val_fraction=0.1, seed=3)
    first, again = S.load_splits(cfg, tmp_path), S.load_splits(cfg, tmp_path)
    assert (len(first.train), len(first.held_out)) == (36, 4)
    assert [c.source for c in first.held_out] == [c.source for c in again.held_out]
    assert not {c.source for c in first.held_out} & {c.source for c in first.train}


def varied_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the a river town baker walked to market with bread and honey under grey sky".split()
    return [{"prompt": " ".join(rng.choice(words, rng.integers(2, 20))),
             "response": " ".join(rng.choice(words, rng.integers(1, 15)))} for _ in range(n)]


def test_packing_truncation_and_padding(tmp_path, sp):
    seq_len = 128
    records = varied_records(60)
    records.append({"prompt": "short question", "response": "word " * 200})  # answer cut: truncated, kept
    records.append({"prompt": "long prompt " * 200, "response": "lost"})  # every target cut away: dropped
    convs = conversations(tmp_path, records)
    packed = S.SFTSequences(convs, sp, seq_len, pack=True)
    unpacked = S.SFTSequences(convs, sp, seq_len, pack=False)
    for data in (packed, unpacked):
        assert (data.stats.examples, data.stats.truncated, data.stats.dropped, data.stats.kept) == (62, 2, 1, 61)
        assert data.lengths.max() <= seq_len + 1 and data.lengths.sum() == data.stats.tokens
    assert len(packed) < len(unpacked) == 61
    # every kept example lies whole in one packed sequence
    assert sorted(len(x) for x in np.split(packed.ids, np.flatnonzero(packed.ids == sp.piece_to_id("<|im_start|>"))[1:])) \
        == sorted(len(x) for x in np.split(unpacked.ids, np.flatnonzero(unpacked.ids == sp.piece_to_id("<|im_start|>"))[1:]))
    loader = S.SFTLoader(unpacked, micro_batch_size=4, global_batch_size=8)
    fixed = unpacked.padding_fraction(np.arange(len(unpacked)))  # unsorted, as if padded to the longest of all
    assert packed.stats.padding_fraction < loader.epoch_padding_fraction() < 1
    assert packed.stats.padding_fraction < 0.1 < fixed
    # the loss still only sees the answers: the truncated answer's kept part, nothing of the dropped example
    batch = S.SFTLoader(packed, 2, 2).next_global_batch()[0]
    assert batch[0].shape == (2, seq_len)
    assert "lost" not in sp.decode(packed.label_of[packed.label_of >= 0].tolist())


def test_isolated_packing_gives_each_example_its_segment(tmp_path, sp):
    """Segment ids number the examples of each packed sequence from 0, each run starting at an
    <|im_start|>, one run per kept example; padding is -1. Unpacked data carries none."""
    convs = conversations(tmp_path, varied_records(40))
    packed = S.SFTSequences(convs, sp, 128, pack=True, isolate=True)
    inputs, labels, segments = packed.batch(np.arange(len(packed)))
    start, runs = sp.piece_to_id("<|im_start|>"), 0
    for row in range(len(packed)):
        n = int(packed.lengths[row]) - 1
        ids, seg = inputs[row, :n].numpy(), segments[row, :n].numpy()
        assert (segments[row, n:] == -1).all() and seg[0] == 0 and ids[0] == start
        boundaries = np.flatnonzero(np.diff(seg)) + 1
        assert (ids[boundaries] == start).all() and np.array_equal(seg[boundaries], np.arange(1, len(boundaries) + 1))
        runs += len(boundaries) + 1
    assert runs == packed.stats.kept == 40 and int(segments.max()) > 0
    assert len(S.SFTSequences(convs, sp, 128, pack=False, isolate=True).batch(np.arange(2))) == 2


def test_first_fit_is_deterministic_and_never_overfills():
    lengths = np.random.default_rng(0).integers(1, 60, 500)
    bins = S.first_fit(lengths, 64)
    assert bins == S.first_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    fill = [int(lengths[b].sum()) for b in bins]
    assert max(fill) <= 64 and sum(fill) / (64 * len(bins)) > 0.95


@pytest.mark.parametrize("pack", [True, False])
def test_loader_resumes_exactly_and_ranks_are_disjoint(tmp_path, sp, pack):
    data = S.SFTSequences(conversations(tmp_path, varied_records(50)), sp, 64, pack=pack)
    loader = S.SFTLoader(data, micro_batch_size=2, global_batch_size=8, seed=5)
    for _ in range(3):
        loader.next_global_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as it travels through the checkpoint record
    expected = [loader.next_global_batch() for _ in range(10)]  # crosses epochs
    resumed = S.SFTLoader(data, micro_batch_size=2, global_batch_size=8, seed=5)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_global_batch() for _ in range(10)]):
        for (wi, wl), (gi, gl) in zip(want, got):
            assert wi.equal(gi) and wl.equal(gl)
    # two ranks split each global batch of one rank: disjoint, together the same sequences
    for step in range(0, 8 * 20, 8):  # across several epochs
        whole = np.concatenate(S.SFTLoader(data, 2, 8, 0, 1, seed=5).rank_micro_batches(step))
        parts = [np.concatenate(S.SFTLoader(data, 2, 8, r, 2, seed=5).rank_micro_batches(step)) for r in range(2)]
        assert [len(p) for p in parts] == [4, 4] and sorted(np.concatenate(parts)) == sorted(whole)
        if step // len(data) == (step + 7) // len(data):  # within one epoch no sequence comes twice
            assert not set(parts[0]) & set(parts[1])
    other = S.SFTSequences(conversations(tmp_path, varied_records(50, seed=1), "other.jsonl"), sp, 64, pack=pack)
    with pytest.raises(PipelineError, match="data or its tokenization changed"):
        S.SFTLoader(other, 2, 8, seed=5).load_state_dict(state)


def test_eval_batches_are_fixed_and_split_across_ranks(tmp_path, sp):
    data = S.SFTSequences(conversations(tmp_path, varied_records(80)), sp, 64, pack=False)
    ranks = [S.sft_eval_batches(data, 4, 3, r, 2) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    first = [b[0].clone() for b in ranks[0]]
    assert all(a.equal(b[0]) for a, b in zip(first, ranks[0]))  # re-iterable: the same batches
    assert not any(a.shape == b[0].shape and a.equal(b[0]) for a, b in zip(first, ranks[1]))
    assert len(S.sft_eval_batches(data, 64, 3, 0, 2)) == 0  # too small for one batch: no validation loss


def test_exact_match_questions_end_with_the_generation_prompt(tmp_path, sp):
    questions = S.exact_match_questions(conversations(tmp_path, [SHAPES["chat"][0]]), sp, 5)
    assert len(questions) == 1 and questions[0].reference == "42, in 1961 中文"
    assert sp.decode(questions[0].prompt_ids).endswith("And the answer to everything? 中文<|im_end|>\n"
                                                      "<|im_start|>assistant\n")


# -- the stage, through the CLI (2 CPU ranks) ---------------------------------------------------------

FINETUNE_STEPS, QUESTIONS = 100, 300
FINETUNE = (f"finetune.max_steps={FINETUNE_STEPS}", "finetune.log_interval=25", "finetune.eval_interval=50",
            f"finetune.save_interval={FINETUNE_STEPS}", f"finetune.eval_exact_match={QUESTIONS}")


def finetune_on_ranks(run_dir: Path, *overrides: str) -> str:
    """`python -m pipeline stages=[finetune]` on 2 ranks without the CLI (conftest.run_on_ranks); returns what
    they logged."""
    return run_on_ranks(f"run_dir={run_dir}", "stages=[finetune]", *BUILTIN, *overrides)


def metric_records(run_dir: Path, key: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("stage") == "finetune" and r.get(key) is not None]


def exact_match_records(run_dir: Path) -> dict[str, dict]:
    return {r["exact_match_when"]: r for r in metric_records(run_dir, "exact_match")}


@pytest.fixture(scope="module")
def pretrained(builtin_pretrained) -> Path:
    """conftest's builtin_pretrained: the built-in world, pretrained long enough for the tiny model to hold
    some of its facts (copy_run it before writing)."""
    return builtin_pretrained


def copy_run(source: Path, target: Path, parts=("tokenizer", "shards", "data", "pretrain", "stages")) -> Path:
    for name in parts:
        shutil.copytree(source / name, target / name)
    return target


def answer_kind(prompt: str) -> str:
    """Which fact a built-in question asks for (the template it was written from)."""
    from pipeline.data import default_corpus as D

    for kind, templates in {**D.PERSON_QUESTIONS, **D.TOWN_QUESTIONS}.items():
        for template in templates:
            pattern = re.escape(template).replace(re.escape("{name}"), ".+").replace(re.escape("{pet}"), "[a-z]+")
            if re.fullmatch(pattern, prompt):
                return kind
    raise AssertionError(f"not a built-in question: {prompt!r}")


def well_formed(kind: str, answer: str) -> bool:
    """The answer is the right kind of thing: a colour for a colour question, a year for a birth year..."""
    from pipeline.data import default_corpus as D

    words = {"profession": D.PROFESSIONS, "pet": D.PETS, "colour": D.COLOURS, "food": D.FOODS}
    if kind in words:
        return answer in words[kind]
    pattern = {"born": r"\d{4}", "founded": r"\d{4}", "population": r"\d+",
               "sibling": r"[A-Z][a-z]+ [A-Z][a-z]+", "friend": r"[A-Z][a-z]+ [A-Z][a-z]+"}.get(kind, r"[A-Z][a-z]+")
    return re.fullmatch(pattern, answer) is not None


@pytest.mark.slow
def test_finetuning_teaches_the_answer_format(pretrained, tmp_path):
    """Before: the base model has never seen the chat template and answers nothing usable. After: it answers
    held-out questions in the right form (a colour, a year, a name) and some of them exactly. (The tiny
    model at this length holds few facts and does not yet look answers up in a passage: exact match stays
    low for both tasks; see README.)"""
    from pipeline.layout import RunLayout

    run_dir = copy_run(pretrained, tmp_path)
    logged = finetune_on_ranks(run_dir, *FINETUNE)
    em = exact_match_records(run_dir)
    assert em["before"]["step"] == 0 and em["after"]["step"] == FINETUNE_STEPS
    assert em["before"]["exact_match_total"] == em["after"]["exact_match_total"] == QUESTIONS
    formed = {}
    for when in ("before", "after"):
        rows = [json.loads(line) for line in RunLayout.of(run_dir).exact_match_answers(when).read_text().splitlines()]
        assert len(rows) == QUESTIONS and sum(r["correct"] for r in rows) == em[when]["exact_match_correct"]
        assert {r["task"] for r in rows} == {"reading", "recall"}
        # the question is the prompt's last line (a reading prompt starts with its passage)
        formed[when] = np.mean([well_formed(answer_kind(r["prompt"].splitlines()[-1]), r["answer"]) for r in rows])
    summary = {when: {k: em[when][f"exact_match{k}"] for k in ("", "_reading", "_recall")} for when in em}
    print(f"exact match on {QUESTIONS} held-out questions (all, reading, recall): {summary}; well-formed answers: "
          f"{formed} (pretrain {BUILTIN_STEPS} steps, finetune {FINETUNE_STEPS} steps)")
    assert formed["after"] >= 0.5 and formed["after"] >= formed["before"] + 0.4, formed
    assert em["after"]["exact_match_correct"] >= em["before"]["exact_match_correct"] + 3, summary
    assert f"exact match on {QUESTIONS} held-out questions: before" in logged
    assert (run_dir / "finetune" / "checkpoints" / f"step_{FINETUNE_STEPS:08d}" / "complete.json").is_file()
    assert metric_records(run_dir, "val_loss")

    # a longer fine-tune resumes from its own checkpoint, not from init (gone here)
    shutil.rmtree(run_dir / "pretrain")
    logged = finetune_on_ranks(run_dir, *FINETUNE[:-1], f"finetune.max_steps={FINETUNE_STEPS + 2}",
                               "finetune.eval_exact_match=8")
    assert f"resumed from {run_dir / 'finetune' / 'checkpoints' / f'step_{FINETUNE_STEPS:08d}'}" in logged
    assert "not measured (resumed run)" in logged


@pytest.mark.slow
def test_init_from_an_hf_export_or_a_zero2_checkpoint_into_zero3(pretrained, tmp_path):
    """The first step's loss (computed with the init weights) is the same whether the weights come from the
    ZeRO 2 pretrain checkpoint (consolidated, into ZeRO 3) or from the export stage's HF folder (safetensors);
    exact match runs before and after under ZeRO 3 without disturbing training."""
    exported = copy_run(pretrained, tmp_path / "exported")
    proc = run_in_process(f"run_dir={exported}", "stages=[export]", "export.source=pretrain", "export.dtype=float32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = {}
    sources = {"zero3": f"pretrain weights {tmp_path / 'zero3' / 'pretrain' / 'checkpoints'}",
               "hf_zero3": f"hf weights {exported / 'export' / 'pretrain'}"}
    for name, overrides in {"zero3": ("deepspeed=zero3",),
                            "hf_zero3": ("deepspeed=zero3", f"finetune.init={exported / 'export' / 'pretrain'}")
                            }.items():
        run_dir = copy_run(pretrained, tmp_path / name)
        logged = finetune_on_ranks(run_dir, *overrides, "precision=fp32", "finetune.max_steps=3",
                                   "finetune.log_interval=1", "finetune.eval_exact_match=16")
        losses[name] = [r["loss"] for r in metric_records(run_dir, "loss")]
        assert len(losses[name]) == 3 and exact_match_records(run_dir)["after"]["exact_match_total"] == 16
        assert f"from {sources[name]}" in logged  # the weights came from where asked
    assert losses["hf_zero3"][0] == pytest.approx(losses["zero3"][0], rel=1e-5), losses
