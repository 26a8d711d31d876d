"""Corpus inputs through the entry point: every supported format, repaired bytes and bad input in-process
(run_in_process; the cases that are bad config rather than bad input through the entry point's own checks,
run_config_checks), a few bad inputs, an unwritable run_dir and debug=true through the real CLI."""
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_RUN, error_lines, mixed_documents, run_cli, run_config_checks, run_in_process, write_jsonl

from pipeline.cluster.distributed import LaunchInfo

DOCS = mixed_documents(200)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "shards" / "manifest.json").read_text())["sources"]["corpus"]


def test_every_input_format_gives_the_same_documents(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[:50])])
    (folder / "b.json").write_text(json.dumps([{"body": d} for d in DOCS[50:100]]))
    pq.write_table(pa.table({"body": DOCS[100:150]}), folder / "c.parquet")
    for i, d in enumerate(DOCS[150:]):
        (folder / "txt").mkdir(exist_ok=True)
        (folder / "txt" / f"{i:03d}.txt").write_text(d)
    # jsonl uses "text", json and parquet use "body": one run per field
    proc = run_in_process(f"run_dir={tmp_path / 'r1'}", f"data.paths=[{folder}/a.jsonl,{folder}/txt]", *SMALL_RUN,
                          "tokenizer.vocab_size=400")
    assert proc.returncode == 0, proc.stderr
    assert manifest(tmp_path / "r1")["corpus"]["documents"] == 100  # a txt file is one document
    proc = run_in_process(f"run_dir={tmp_path / 'r2'}", f"data.paths=['{folder}/*.json',{folder}/c.parquet]",
                          *SMALL_RUN, "data.text_field=body", "tokenizer.vocab_size=400")
    assert proc.returncode == 0, proc.stderr
    assert manifest(tmp_path / "r2")["corpus"]["documents"] == 100


def test_blank_line_split_of_text_files(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(DOCS))
    common = (f"data.paths=[{tmp_path / 't.txt'}]", *SMALL_RUN, "tokenizer.vocab_size=400")
    assert run_in_process(f"run_dir={tmp_path / 'whole'}", *common).returncode == 0
    assert manifest(tmp_path / "whole")["corpus"]["documents"] == 1
    assert run_in_process(f"run_dir={tmp_path / 'split'}", *common, "data.split_on_blank_lines=true").returncode == 0
    assert manifest(tmp_path / "split")["corpus"]["documents"] >= len(DOCS)


def test_invalid_utf8_nul_and_empty_documents_are_counted_not_fatal(tmp_path):
    good = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl").write_bytes(good + b'{"text": "bad \xff\xfe bytes"}\n{"text": "nul \\u0000 here"}\n'
                                       b'{"text": ""}\n{"text": "   "}\n{"text": null}\n')
    (tmp_path / "b.txt").write_bytes(b"text file \xc3\x28 broken")
    proc = run_in_process(f"run_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path}/a.jsonl,{tmp_path}/b.txt]",
                          *SMALL_RUN, "tokenizer.vocab_size=400")
    assert proc.returncode == 0, proc.stderr
    corpus = manifest(tmp_path / "run")["corpus"]
    assert corpus["skipped_empty"] == 3
    assert corpus["replaced_chars"] == 4  # \xff, \xfe, the NUL, and \xc3 of the broken pair
    assert corpus["documents"] == len(DOCS) + 3
    assert "invalid UTF-8" in proc.stdout + proc.stderr


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, a phrase the error line must contain)."""
    write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": "  \n "}])
    write_jsonl(tmp / "nofield.jsonl", [{"body": d} for d in DOCS[:20]])
    (tmp / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    write_jsonl(tmp / "ok.jsonl", [{"text": d} for d in DOCS[:40]])
    (tmp / "not_a_model.model").write_bytes(b"this is not a sentencepiece model")
    (tmp / "notes.csv").write_text("a,b\n")
    ok = f"data.paths=[{tmp / 'ok.jsonl'}]"
    return {
        "missing path": ([f"data.paths=[{tmp / 'nope.jsonl'}]"], "does not exist"),
        "glob matching nothing": ([f"data.paths=['{tmp}/*.xyz.jsonl']"], "matches no file"),
        "empty corpus": ([f"data.paths=[{tmp / 'empty.jsonl'}]"], "no non-empty document"),
        "wrong text field": ([f"data.paths=[{tmp / 'nofield.jsonl'}]"], "no field 'text'"),
        "malformed json": ([f"data.paths=[{tmp / 'malformed.jsonl'}]"], "malformed.jsonl"),
        "vocab too large": ([ok, "tokenizer.vocab_size=5000"], "too large for this corpus"),
        "not a sentencepiece model": ([ok, f"tokenizer.path={tmp / 'not_a_model.model'}"], "not a SentencePiece"),
        "missing tokenizer.path": ([ok, f"tokenizer.path={tmp / 'none.model'}"], "does not exist"),
        "no data.paths": (["data.paths=[]"], "data.paths is empty"),
        "unsupported file type": ([f"data.paths=[{tmp / 'notes.csv'}]"], "is not one of"),
        "unknown model type": ([ok, "tokenizer.model_type=wordpiece"], "bpe or unigram"),
        "vocab below bytes": ([ok, "tokenizer.vocab_size=100"], "below"),
        "unknown key": ([ok, "tokenizer.vocab=10"], "tokenizer.vocab"),
        "mistyped value": ([ok, "tokenizer.vocab_size=many"], "many"),
        "unknown stage": ([ok, "stages=[tokenise]"], "unknown stage"),
        "unknown data option": ([ok, "data=web"], "data/web"),
        "bad worker index": ([ok, "shard.num_workers=2", "shard.worker_index=5"], "worker_index"),
        "shard without tokenizer": ([ok, "stages=[shard]"], "no tokenizer"),
    }


with tempfile.TemporaryDirectory() as _scratch:  # bad_cases writes its files: not into / at collection
    CASES = sorted(bad_cases(Path(_scratch)).keys())
# refused by Hydra's composition or by validate() before run_dir is created: no process needed
CONFIG_CASES = {"unknown model type", "vocab below bytes", "unknown key", "mistyped value", "unknown stage",
                "unknown data option", "bad worker index"}


def assert_one_error_line_and_no_artifact(tmp_path: Path, case: str, run) -> None:
    overrides, phrase = bad_cases(tmp_path)[case]
    run_dir = tmp_path / "run"
    stages = [] if any(o.startswith("stages=") for o in overrides) else ["stages=[tokenize,shard]"]
    proc = run(f"run_dir={run_dir}", "data=files", "tokenizer.vocab_size=400", *stages, *overrides)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "tokenizer" / "tokenizer.model").exists()
    assert not (run_dir / "shards").exists()
    assert not list(run_dir.glob("stages/*.json"))


@pytest.mark.parametrize("case", [c for c in CASES if c in CONFIG_CASES])
def test_bad_config_gives_one_error_line_and_no_artifact(tmp_path, case):
    assert_one_error_line_and_no_artifact(tmp_path, case, run_config_checks)


@pytest.mark.parametrize("case", [c for c in CASES if c not in CONFIG_CASES])
def test_bad_input_gives_one_error_line_and_no_artifact(tmp_path, case):
    """In-process (run_in_process: the entry point and the runner as the CLI runs them); three cases through
    the real CLI below as well."""
    assert_one_error_line_and_no_artifact(tmp_path, case, run_in_process)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing path", "malformed json", "not a sentencepiece model"])
def test_bad_input_through_the_real_cli(tmp_path, case):
    assert_one_error_line_and_no_artifact(tmp_path, case, run_cli)


@pytest.mark.slow
def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli(f"run_dir={blocker}/run", "stages=[tokenize]")
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "run_dir" in error_lines(proc)[0]


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(f"run_dir={tmp_path}", "data=files", f"data.paths=[{tmp_path}/none.txt]",
                   "stages=[tokenize]", "debug=true")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_launch_info_from_torchrun_and_slurm():
    torchrun = LaunchInfo.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert torchrun == LaunchInfo(rank=3, world_size=8, local_rank=1, local_world_size=4, under_launcher=True)
    slurm = LaunchInfo.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                 "SLURM_NTASKS_PER_NODE": "4(x2)"})
    assert slurm == LaunchInfo(rank=5, world_size=8, local_rank=1, local_world_size=4, under_launcher=True)
    assert not LaunchInfo.from_env({}).under_launcher


def test_srun_variables_become_torch_variables():
    from pipeline.cluster.distributed import export_torch_env, first_host

    assert first_host("gpu[003-004,010],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "n[10-11]"}
    export_torch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "4", "1", "n10", "29500")
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    export_torch_env(torchrun)  # torchrun's variables win
    assert torchrun["RANK"] == "0" and "MASTER_ADDR" not in torchrun
