"""The exported tokenizer in transformers 4: AutoTokenizer loads it, without protobuf, with the ids of
SentencePiece and of transformers 5 (this environment). transformers 4 is installed from the package registry
into a venv of its own (no system packages: no protobuf, no torch), kept under the temp dir by version."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ADVERSARIAL

TRANSFORMERS_4 = "4.57.6"
TEXTS = [*ADVERSARIAL, "Zoubar Kelith lives in Komdale.\n\nQuestion: Where?\nAnswer: Komdale", " leading space"]
CHAT = [{"role": "user", "content": "Where does Zoubar live?"}, {"role": "assistant", "content": "Komdale"}]

SCRIPT = """
import json, sys
import transformers
try:
    import google.protobuf
    protobuf = True
except ImportError:
    protobuf = False
from transformers import AutoTokenizer
folder, texts, chat = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = [tokenizer.encode(t) for t in texts]
print(json.dumps({"version": transformers.__version__, "protobuf": protobuf, "ids": ids,
                  "decoded": [tokenizer.decode(i) for i in ids],
                  "chat": tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False))}))
"""


def transformers_4_venv() -> Path:
    """A venv with transformers TRANSFORMERS_4 (and jinja2, for chat templates) from the registry, made once."""
    venv = Path(tempfile.gettempdir()) / f"pipeline-transformers-{TRANSFORMERS_4}"
    python = venv / "bin" / "python"
    if not (venv / "complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", f"transformers=={TRANSFORMERS_4}", "jinja2"],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"cannot install transformers=={TRANSFORMERS_4} from the registry: {proc.stderr[-500:]}")
        (venv / "complete").write_text("")
    return python


def encoded(python: str, folder: Path) -> dict:
    proc = subprocess.run([python, "-c", SCRIPT, str(folder), json.dumps(TEXTS), json.dumps(CHAT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_export_tokenizer_loads_in_transformers_4_and_5_with_the_same_ids(data_run, tmp_path):
    from pipeline.data.vocab import load_tokenizer
    from pipeline.hf.tokenizer import write_tokenizer

    folder = tmp_path / "export"
    folder.mkdir()
    model = data_run / "tokenizer" / "tokenizer.model"
    write_tokenizer(model, folder, max_length=512)
    # llama.cpp's convert_hf_to_gguf.py takes the GGUF's add_space_prefix from this key: it must stay false
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_prefix_space"] is False
    sp = load_tokenizer(model)
    current, old = encoded(sys.executable, folder), encoded(str(transformers_4_venv()), folder)
    assert current["version"].startswith("5.") and old["version"] == TRANSFORMERS_4 and not old["protobuf"]
    assert old["ids"] == current["ids"] == [sp.encode(t) for t in TEXTS]
    assert old["decoded"] == current["decoded"]
    assert old["chat"] == current["chat"]
