"""Shared helpers: run the real CLI in a subprocess, and small generated corpora."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ADVERSARIAL = [
    "def f(x):\n\tif x:\n        return  x\n\n",
    "    indented\n\t\ttabs\t\n\n\n  trailing   \n",
    "  leading and trailing spaces  ",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🙂🚀👩‍💻 and flags 🇫🇷",
    "mixed\r\nline endings\rand\x0bvertical\x0ctabs",
    "numbers 1234567890 3.14159 -42",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<s></s><pad><unk> look like specials but are text",
    "",
    " ",
    "\n",
    "a" * 3000,
    "Zalgo: Z̴̡̪͚a̷l̸g̵o̶",
]


def run_cli(*overrides: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline OVERRIDES...` as a user runs it."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def mixed_documents(n: int, seed: int = 0) -> list[str]:
    """Prose, code, CJK, emoji and numbers: enough variety for a small tokenizer to train on."""
    rng = random.Random(seed)
    words = "the a river town baker walked to market with bread and honey under grey sky".split()
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + ".")
        elif kind == 1:
            docs.append(f"def item_{i}(x):\n    if x > {rng.randint(0, 999)}:\n\treturn x * {i}\n    return None\n")
        elif kind == 2:
            docs.append(rng.choice(ADVERSARIAL[:8]) + " " + " ".join(rng.choice(words) for _ in range(30)))
        else:
            docs.append(f"Row {i}\t{rng.randint(1000, 9999)}\t{rng.random():.4f}\n" * rng.randint(1, 8))
    return docs


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl",
                       [{"text": d} for d in mixed_documents(400)])


SMALL_RUN = ("data=files", "tokenizer.vocab_size=600", "data.val_fraction=0.1", "stages=[tokenize,shard]")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_corpus) -> Path:
    """A run directory with a trained tokenizer and shards of `small_corpus`."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_cli(f"run_dir={run_dir}", f"data.paths=[{small_corpus}]", *SMALL_RUN)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="session")
def data_run(tmp_path_factory) -> Path:
    """Tokenizer and shards of a small built-in corpus (copy it before writing into it)."""
    run_dir = tmp_path_factory.mktemp("data")
    proc = run_cli(f"run_dir={run_dir}", "stages=[tokenize,shard]", "data.default_num_documents=2000",
                   "tokenizer.vocab_size=1024", "data.val_fraction=0.05")
    assert proc.returncode == 0, proc.stderr
    return run_dir
