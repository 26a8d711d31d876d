"""Built-in lm-evaluation-harness tasks for the built-in corpus (data=default), from its generated world.

Held out as the instruction set is: the test split asks only about held-out people and towns, whose facts
are in the pretraining corpus but whose questions never are; a `train` split about the other people gives
lm-eval its few-shot examples (eval.num_fewshot). Each task is an lm-eval task YAML with local JSONL data,
so lm-eval reads it offline as it reads a user's own tasks (eval.include_path).

- `world_facts` (multiple choice, log-likelihood): a fact sentence about a held-out person as the corpus states
  it ("Zoubar Kelith lives in"), and four choices: the true town (colour, food, birth year, sibling or best
  friend) and three others of the same kind; chance is 0.25.
- `world_qa` (generation, exact match): QA_TEST of the instruction set's held-out questions, recall and reading,
  written as the corpus's own quizzes write them (`Question: ...` / `Answer: ...`); greedy, first line.

Only the world API of default_corpus (generate_world, World, Person, instructions) is used here.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import yaml

from ..fsutil import atomic_write_bytes
from .default_corpus import World, generate_world, instructions

TASKS_VERSION = 1  # bump when the documents or the YAML change: the eval stage then reruns
MC_TASK, QA_TASK = "world_facts", "world_qa"
BUILTIN_TASKS = (MC_TASK, QA_TASK)
CHOICES = 4
QA_TEST = 300  # a seeded sample of the ~1100 held-out questions: generation is the slow part of the stage

# fact -> (the corpus's own sentence up to the answer, the attribute holding it)
FACT_CONTEXTS = {"town": "{name} lives in", "colour": "The favourite colour of {name} is",
                 "food": "The favourite food of {name} is", "born": "{name} was born in",
                 "sibling": "{name} is the sibling of", "friend": "The best friend of {name} is"}


def fact_documents(world: World, held_out: bool) -> list[dict]:
    """One multiple-choice document per person (held out or not) and fact of FACT_CONTEXTS."""
    rng = random.Random(f"{world.seed}:eval-facts:{held_out}")
    # the values the world uses, in a fixed order (a set's order would change with the hash seed)
    options = {"town": [t.name for t in world.towns], "sibling": [p.name for p in world.people],
               "friend": [p.name for p in world.people],
               **{fact: sorted({getattr(p, fact) for p in world.people}) for fact in ("colour", "food", "born")}}
    docs = []
    for person in (p for p in world.people if p.held_out == held_out):
        for fact, context in FACT_CONTEXTS.items():
            answer = getattr(person, fact)
            others = [o for o in options[fact] if o not in (answer, person.name)]
            choices = [str(c) for c in rng.sample(others, CHOICES - 1) + [answer]]
            rng.shuffle(choices)
            docs.append({"context": context.format(name=person.name), "choices": choices,
                         "label": choices.index(str(answer)), "fact": fact, "person": person.name})
    return docs


def qa_documents(pairs: list[dict]) -> list[dict]:
    """Instruction-set pairs as the corpus's quizzes ask them: an optional passage, then Question/Answer."""
    docs = []
    for pair in pairs:
        passage, _, question = pair["prompt"].rpartition("\n\n")
        text = (passage + "\n\n" if passage else "") + f"Question: {question}\nAnswer:"
        docs.append({"prompt": text, "answer": pair["response"], "kind": pair["task"]})
    return docs


def _data(path: Path) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(path / "train.jsonl"),
                                                                      "test": str(path / "test.jsonl")}},
            "training_split": "train", "fewshot_split": "train", "test_split": "test"}


def task_configs(out_dir: Path) -> dict[str, dict]:
    """The lm-eval YAML config of each built-in task whose data lies in out_dir/<task>/."""
    return {
        MC_TASK: {"task": MC_TASK, **_data(out_dir / MC_TASK), "output_type": "multiple_choice",
                  "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "label",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
                  "metadata": {"version": TASKS_VERSION}},
        QA_TASK: {"task": QA_TASK, **_data(out_dir / QA_TASK), "output_type": "generate_until",
                  "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": " ",
                  "generation_kwargs": {"until": ["\n\n", "</s>"], "max_gen_toks": 16, "do_sample": False},
                  # the answer's line: quizzes put it after "Answer:" or on the next line
                  "filter_list": [{"name": "first_line", "filter": [
                      {"function": "regex", "regex_pattern": r"\S[^\n]*", "fallback": ""},
                      {"function": "take_first"}]}],
                  "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                  "metadata": {"version": TASKS_VERSION}},
    }


def task_files(seed: int, out_dir: Path) -> dict[Path, bytes]:
    """Every file of the built-in tasks for the world of `seed`, by path under out_dir (nothing written)."""
    world = generate_world(seed)
    train_pairs, eval_pairs = instructions(world, seed)
    data = {MC_TASK: (fact_documents(world, held_out=False), fact_documents(world, held_out=True)),
            QA_TASK: (qa_documents(train_pairs),
                      qa_documents(random.Random(f"{seed}:eval-qa").sample(eval_pairs, min(QA_TEST, len(eval_pairs)))))}
    files = {}
    for name, config in task_configs(out_dir).items():
        for split, docs in zip(("train", "test"), data[name]):
            files[out_dir / name / f"{split}.jsonl"] = "".join(json.dumps(d) + "\n" for d in docs).encode()
        files[out_dir / name / f"{name}.yaml"] = yaml.safe_dump(config, sort_keys=False).encode()
    return files


def files_digest(files: dict[Path, bytes]) -> str:
    digest = hashlib.sha256(f"tasks v{TASKS_VERSION}".encode())
    for path in sorted(files):
        digest.update(f"{path.name}:{hashlib.sha256(files[path]).hexdigest()}".encode())
    return digest.hexdigest()


def write_builtin_tasks(seed: int, out_dir: Path) -> Path:
    """The built-in tasks' YAML and data under out_dir (each file written atomically); returns out_dir,
    the folder to hand lm-eval as an include path."""
    for path, content in task_files(seed, out_dir).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != content:
            atomic_write_bytes(path, content)
    return out_dir
