"""Secrets never reach logs, metrics, saved configs, checkpoint records, wandb or model cards.

A secret is the value of `WANDB_API_KEY` or of any environment variable named `*_TOKEN`, `*_KEY`,
`*_SECRET` or `*_PASSWORD` (wherever it turns up, e.g. through `${oc.env:HF_TOKEN}` in an override),
and in config data also the value of a credential-named key (`api_key`, `auth_token`, ...) or a value
shaped like a known token (`hf_...`, `sk-...`). Kept free of torch so that the entry point can use it.
"""
from __future__ import annotations

import logging
import os
import re

REDACTED = "<redacted>"

_SECRET_ENV = re.compile(r"(_TOKEN|_KEY|_SECRET|_PASSWORD)$")
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|credentials?|auth)($|_)", re.I)
# Known token prefixes, and W&B's classic 40-hex keys. Not every long id: run names such as
# "llama-125m-cosine-lr3e-3-bs512-seq1024" and our sha256 digests must survive.
_SECRET_VALUE = re.compile(r"^(hf_|sk-|ghp_|gho_|github_pat_|xox[bp]-|AKIA|wandb_v1_)[A-Za-z0-9_\-]{12,}$"
                           r"|^[0-9a-f]{40}$")
_MIN_SECRET_LEN = 4  # shorter values ("0", "true") would blank out ordinary text


def secret_values() -> list[str]:
    """Values of the secret environment variables, longest first (a secret containing another is
    replaced whole). Read at every call: a test or launcher may set them late."""
    values = {v for k, v in os.environ.items()
              if (k.upper() == "WANDB_API_KEY" or _SECRET_ENV.search(k.upper())) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value replaced."""
    for value in secret_values() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def redact_values(node, secrets: list[str] | None = None):
    """Data with secret environment values replaced in every string (keys included) and nothing else
    touched: for records whose other strings must survive as they are (checkpoint records)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(node, dict):
        return {redact_values(k, secrets): redact_values(v, secrets) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_values(v, secrets) for v in node]
    return redact_text(node, secrets) if isinstance(node, str) and secrets else node


def redact(node, key: str = "", secrets: list[str] | None = None):
    """Config data with credentials replaced: values of credential-named keys, token-shaped values,
    and secret environment values wherever they appear."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(node, dict):
        return {redact_text(str(k), secrets) if isinstance(k, str) else k: redact(v, str(k), secrets)
                for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact(v, key, secrets) for v in node]
    if isinstance(node, str) and node and (_SECRET_KEY.search(key) or _SECRET_VALUE.match(node)):
        return REDACTED
    return redact_text(node, secrets) if isinstance(node, str) else node


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with secret environment values replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if secrets:
            message = record.getMessage()
            cleaned = redact_text(message, secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """On the root logger's handlers (what propagates there) and on DeepSpeed's logger itself (it does
    not propagate, and may add its handler only later, on import), so nothing this process logs shows
    a secret value. Idempotent."""
    targets = [*logging.getLogger().handlers, logging.getLogger("DeepSpeed")]
    for target in targets:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())
