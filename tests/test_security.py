"""No secret reaches the run directory, the console, wandb or a model card."""
from __future__ import annotations

import logging

import pytest
from conftest import TINY, run_cli

from pipeline.redaction import REDACTED, RedactingFilter, redact, redact_text, redact_values

SECRETS = {"WANDB_API_KEY": "sekrit123", "HF_TOKEN": "hf_Zq81mSecretTokenValue", "DB_PASSWORD": "pw-hunter2-xyz",
           "S3_SECRET": "AbCdEf0123456789", "AWS_SECRET_ACCESS_KEY": "aws/Secret+Key=0123"}


@pytest.mark.slow
def test_secrets_from_the_environment_appear_nowhere(tmp_path):
    """tokenize → shard → pretrain (2 ranks) → export with wandb offline (its files land in run_dir), the
    secrets pulled into config values through ${oc.env:...} overrides: wandb's API key, run name, tags and
    DeepSpeed's JSON (which DeepSpeed pickles into every checkpoint). Then every byte below run_dir and
    the console output are searched for the values."""
    proc = run_cli(f"run_dir={tmp_path}", "stages=[tokenize,shard,pretrain,export]", "data.default_num_documents=300",
                   "tokenizer.vocab_size=512", "data.val_fraction=0.1", *TINY, "train.max_steps=2",
                   "train.eval_interval=2", "export.source=pretrain",
                   "launch.nproc_per_node=2", "logging.wandb.mode=offline",
                   "logging.wandb.api_key=${oc.env:WANDB_API_KEY}", "logging.wandb.name=run-${oc.env:HF_TOKEN}",
                   "logging.wandb.tags=[${oc.env:DB_PASSWORD}]", "+deepspeed.extra.comment=${oc.env:S3_SECRET}",
                   env=SECRETS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (tmp_path / "export" / "pretrain" / "README.md").is_file()
    for name, value in SECRETS.items():
        assert value not in proc.stdout and value not in proc.stderr, name
        leaks = [path for path in files if value.encode() in path.read_bytes()]
        assert not leaks, (name, leaks)
    for path in (tmp_path / "config.yaml", tmp_path / "export" / "pretrain" / "README.md"):
        assert "api_key: <redacted>" in path.read_text() and "name: run-<redacted>" in path.read_text()


def test_redaction_helpers(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    monkeypatch.setenv("MY_SERVICE_KEY", "k3y-value")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: the name does not end in _TOKEN
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact without mangling ordinary text
    assert redact_text("push with hf_abcdefghijkl and k3y-value") == f"push with {REDACTED} and {REDACTED}"
    assert redact_text("parallelism false, batch 1") == "parallelism false, batch 1"
    digest = "0123456789abcdef" * 4  # sha256 digests in our records are not tokens, nor long run names
    config = {"logging": {"wandb": {"api_key": "x", "name": "run-hf_abcdefghijkl", "group": "0123abcd" * 5,
                                    "tags": ["sk-abcdefghijklmnop", "llama-125m-cosine-lr3e-3-bs512-seq1024"]}},
              "shards": digest, "paths": ["/data/k3y-value/a.txt"], "lr": 0.1}
    assert redact(config) == {"logging": {"wandb": {"api_key": REDACTED, "name": f"run-{REDACTED}", "group": REDACTED,
                                                    "tags": [REDACTED, "llama-125m-cosine-lr3e-3-bs512-seq1024"]}},
                              "shards": digest, "paths": [f"/data/{REDACTED}/a.txt"], "lr": 0.1}
    # checkpoint records: only the environment's values go, whatever the key (resume compares the rest)
    assert redact_values({"token": "abc", "k3y-value": ["hf_abcdefghijkl", 3]}) == \
        {"token": "abc", REDACTED: [REDACTED, 3]}
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key is %s", ("k3y-value",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == f"key is {REDACTED}"
