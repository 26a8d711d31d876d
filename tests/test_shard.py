"""The shard stage: contents, format, manifest, determinism, parts and merge, crash safety."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import ROOT, SMALL_RUN, mixed_documents, run_in_process, split_documents, write_jsonl
from distributed import free_port

from pipeline.stages.shard import is_validation


def test_shards_equal_a_direct_encode_plus_eos(small_run):
    texts = mixed_documents(400)
    sp = spm.SentencePieceProcessor(model_file=str(small_run / "tokenizer" / "tokenizer.model"))
    val = is_validation(np.arange(len(texts)), seed=1234, fraction=0.1)
    docs = split_documents(small_run)
    expected_train = [sp.encode(t) + [sp.eos_id()] for t, v in zip(texts, val) if not v]
    expected_val = [sp.encode(t) + [sp.eos_id()] for t, v in zip(texts, val) if v]
    assert docs["train"] == expected_train
    assert docs["val"] == expected_val
    assert 10 <= len(expected_val) <= 80  # about 10 % of 400


def test_manifest_describes_the_files(small_run):
    shards = small_run / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(small_run / "tokenizer" / "tokenizer.model"))
    tokenizer_sha = hashlib.sha256((small_run / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["format"] == "MMIDIDX" and manifest["format_version"] == 2
    assert manifest["tokenizer_sha256"] == tokenizer_sha
    assert manifest["vocab_size"] == sp.get_piece_size() and manifest["dtype"] == "uint16"
    assert manifest["eos_id"] == sp.eos_id()
    assert sorted(manifest["sources"]) == ["corpus"]  # data=files with data.paths: a mixture of one source
    for split, body in manifest["sources"]["corpus"]["splits"].items():
        for shard in body["shards"]:
            for suffix in ("bin", "idx"):
                data = (shards / split / f"{shard['prefix']}.{suffix}").read_bytes()
                assert hashlib.sha256(data).hexdigest() == shard[f"{suffix}_sha256"]
                assert len(data) == shard[f"{suffix}_bytes"]
        assert body["tokens"] == sum(s["num_tokens"] for s in body["shards"])
    assert manifest["sources"]["corpus"]["corpus"]["documents"] == 400


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_byte_identical_whatever_threads_and_batches(tmp_path, small_run, small_corpus):
    tokenizer = small_run / "tokenizer" / "tokenizer.model"
    digests = []
    for threads, batch_mb in ((1, 0.002), (2, 8.0)):
        run_dir = tmp_path / f"t{threads}"
        proc = run_in_process(f"run_dir={run_dir}", f"data.paths=[{small_corpus}]", *SMALL_RUN,
                              f"tokenizer.path={tokenizer}", f"shard.encode_threads={threads}",
                              f"shard.batch_mb={batch_mb}", "shard.shard_size_mb=0.01")
        assert proc.returncode == 0, proc.stderr
        digests.append(tree_digest(run_dir / "shards"))
    assert len([k for k in digests[0] if k.startswith("train/")]) > 2  # several shards were written
    assert digests[0] == digests[1]


def test_parts_written_by_separate_jobs_merge_into_one_manifest(tmp_path, small_run, small_corpus):
    tokenizer = small_run / "tokenizer" / "tokenizer.model"
    common = (f"run_dir={tmp_path}", f"data.paths=[{small_corpus}]", *SMALL_RUN, f"tokenizer.path={tokenizer}",
              "shard.num_workers=3")
    proc = run_in_process(*common)  # merge before the parts exist
    assert proc.returncode != 0 and "shard part 0 of 3 is missing" in proc.stderr
    for part in range(3):
        proc = run_in_process(*common, f"shard.worker_index={part}")
        assert proc.returncode == 0, proc.stderr
        assert not (tmp_path / "shards" / "manifest.json").exists()
    proc = run_in_process(*common)
    assert proc.returncode == 0, proc.stderr
    merged, single = split_documents(tmp_path), split_documents(small_run)
    for split in ("train", "val"):
        assert sorted(map(tuple, merged[split])) == sorted(map(tuple, single[split]))
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_parts"] == 3 and not (tmp_path / "shards.parts").exists()


@pytest.mark.slow
def test_killed_run_leaves_nothing_complete_and_rerun_finishes(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in mixed_documents(400) * 30])
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", f"data.paths=[{corpus}]", *SMALL_RUN)
    assert run_in_process(*args[:-1], "stages=[tokenize]").returncode == 0
    slow = ("shard.encode_threads=1", "shard.batch_mb=0.01", "shard.shard_size_mb=0.05")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, *slow], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((run_dir / "shards.tmp").glob("train/*.idx")):
        time.sleep(0.05)  # wait until at least one shard was published inside the staging folder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((run_dir / "shards.tmp").glob("train/*.idx")), "the run finished before it could be killed"
    assert not (run_dir / "shards").exists()
    assert not (run_dir / "stages" / "shard.json").exists()
    # the same stage inputs (shard size); batches and threads, which change no output byte, back to defaults
    proc = run_in_process(*args, slow[-1])
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())["sources"]["corpus"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 12000
    assert not (run_dir / "shards.tmp").exists()


def test_complete_stages_are_skipped_and_changed_ones_rerun(tmp_path, small_corpus):
    args = (f"run_dir={tmp_path}", f"data.paths=[{small_corpus}]", *SMALL_RUN)
    assert run_in_process(*args).returncode == 0
    manifest_mtime = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    proc = run_in_process(*args)
    assert proc.stdout.count("complete and unchanged, skipped") == 2
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == manifest_mtime
    proc = run_in_process(*args, "data.val_fraction=0.2")  # the split changed: shard reruns, tokenize does not
    assert "tokenize: complete and unchanged" in proc.stdout and "shard: running" in proc.stdout
    proc = run_in_process(*args, "data.val_fraction=0.2", "force=true")
    assert "tokenize: running" in proc.stdout and "shard: running" in proc.stdout
    (tmp_path / "shards" / "val" / "00000.bin").write_bytes(b"damaged")  # a damaged output is rebuilt
    proc = run_in_process(*args, "data.val_fraction=0.2")
    assert "shard: running" in proc.stdout and proc.returncode == 0


@pytest.mark.slow
def test_data_stages_under_torchrun_split_the_work_and_merge(tmp_path, small_run, small_corpus):
    """Two ranks from launch/torchrun.sh: rank 0 trains the tokenizer, each rank encodes its part,
    rank 0 merges; the result holds the same documents as a single-process run."""
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), f"run_dir={tmp_path}",
                           f"data.paths=[{small_corpus}]", *SMALL_RUN], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tokenizer" / "tokenizer.model").read_bytes() == \
        (small_run / "tokenizer" / "tokenizer.model").read_bytes()
    merged, single = split_documents(tmp_path), split_documents(small_run)
    for split in ("train", "val"):
        assert sorted(map(tuple, merged[split])) == sorted(map(tuple, single[split]))
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["num_parts"] == 2
