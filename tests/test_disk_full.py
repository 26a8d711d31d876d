"""Full disks, for real: the folder a stage writes is a small tmpfs mounted for the test (root only). A checkpoint
save, an export or a shard stage that runs out of space ends with one `error:` line naming the path and the
space, leaves no temp files, keeps what was there before, and a rerun with space completes (a training run
resumes from its previous checkpoint)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import SMALL_RUN, TINY, error_lines, fresh_run, pretrain_cli, run_in_process, run_on_ranks

from pipeline.checkpoint.store import verify
from pipeline.layout import RunLayout

MB = 1024  # tmpfs sizes are given in KiB


@pytest.fixture
def small_disk(tmp_path):
    """mount(name, size_kib): a tmpfs of that size at tmp_path/name; unmounted after the test."""
    mounted = []

    def mount(name: str, size_kib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("the full-disk tests mount a small tmpfs (mount -t tmpfs), which needs root")
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the full-disk tests need one")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(path)], check=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.slow
def test_a_checkpoint_save_on_a_full_disk_stops_cleanly_and_the_rerun_resumes(tmp_path, data_run, small_disk):
    """The tiny model's checkpoint takes about 3.1 MiB: on 5 MiB the step-2 save fits and the step-4 one
    (written in the background while the step-2 one is still kept) does not."""
    run_dir = fresh_run(data_run, tmp_path / "run")
    disk = small_disk("checkpoints", 5 * MB)
    (run_dir / "pretrain").mkdir()
    (run_dir / "pretrain" / "checkpoints").symlink_to(disk)
    root = RunLayout.of(run_dir).checkpoints("pretrain")
    args = ("train.max_steps=4", "train.save_interval=2", "train.keep_last=1", "launch.nproc_per_node=2")
    proc = pretrain_cli(run_dir, *args, check=False)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert re.fullmatch(
        # whichever write meets the full disk first: a writer's .pt file, or rank 0's copy of DeepSpeed's scripts
        rf"error: pretrain: checkpoint {root}/step_00000004: writing (\S+\.pt|DeepSpeed's recovery scripts): no space "
        rf"left on the device of {root}/step_00000004 \((needs about [\d.]+ [KM]iB, )?[\d.]+ (bytes|KiB|MiB) free\); "
        rf"the failed save was "
        rf"removed and the last good checkpoint is {root}/step_00000002: free space there, then rerun the same "
        rf"command to resume from it", errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in disk.glob("step_*")) == ["step_00000002"] and leftovers(disk) == []
    assert verify(disk / "step_00000002", digests=True)[0] is not None

    resize(disk, 20 * MB)  # space freed: the same command resumes from step 2 (on forked ranks: quicker)
    logs = run_on_ranks(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, *args)
    assert f"resumed from {root}/step_00000002 at step 2" in logs
    assert verify(disk / "step_00000004", digests=True)[0]["step"] == 4


@pytest.mark.slow  # two_local_ranks is a training run
def test_an_export_on_a_full_disk_keeps_nothing_and_the_rerun_completes(tmp_path, two_local_ranks, small_disk):
    run_dir = tmp_path / "run"
    for name in ("tokenizer", "pretrain"):
        shutil.copytree(two_local_ranks / name, run_dir / name)
    disk = small_disk("export", 64)
    (run_dir / "export").symlink_to(disk)
    proc = run_in_process(f"run_dir={run_dir}", "stages=[export]", "export.source=pretrain")
    assert proc.returncode != 0
    target = RunLayout.of(run_dir).export("pretrain")
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert re.fullmatch(
        rf"error: export of pretrain: no space left on the device of {target}\.tmp-\d+ \(needs about [\d.]+ [KM]iB, "
        rf"[\d.]+ (bytes|KiB) free\); nothing was kept \(an earlier {target} is unchanged\): free space there or "
        rf"set run_dir on a larger disk, then rerun stages=\[export\]", errors[0]), errors[0]
    assert list(disk.iterdir()) == []

    resize(disk, 16 * MB)
    proc = run_in_process(f"run_dir={run_dir}", "stages=[export]", "export.source=pretrain")
    assert proc.returncode == 0, proc.stderr
    assert (disk / "pretrain" / "model.safetensors").is_file() and (disk / "pretrain" / "config.json").is_file()
    assert leftovers(disk) == []


def test_a_shard_stage_on_a_full_disk_removes_its_staging_and_the_rerun_completes(small_run, small_corpus,
                                                                                   small_disk):
    """The run_dir itself on the tmpfs: room for the tokenizer and the run's records, not the shards (67 KB)."""
    run_dir = small_disk("run", 40)
    (run_dir / "tokenizer").mkdir()
    shutil.copy(small_run / "tokenizer" / "tokenizer.model", run_dir / "tokenizer" / "tokenizer.model")
    args = (f"run_dir={run_dir}", f"data.paths=[{small_corpus}]", *SMALL_RUN[:-1], "stages=[shard]")
    proc = run_in_process(*args)
    assert proc.returncode != 0
    assert [bool(re.fullmatch(
        rf"error: shard: no space left on the device of {run_dir} \([\d.]+ (bytes|KiB) free\); the unfinished "
        rf"shards were removed \(an earlier shards/ is unchanged\): free space there or set run_dir on a larger "
        rf"disk, then rerun the same command", line)) for line in error_lines(proc)] == [True], proc.stderr
    assert not (run_dir / "shards.tmp").exists() and not (run_dir / "shards").exists()
    assert leftovers(run_dir) == []

    resize(run_dir, 512)
    proc = run_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "shards" / "manifest.json").read_bytes() == (small_run / "shards" / "manifest.json").read_bytes()


@pytest.mark.parametrize("background", [True, False])
def test_the_checkpoint_writer_names_the_space_and_frees_a_failed_save(small_disk, background):
    """Both ways of writing (train.async_checkpoint): the failure is kept for the trainer's check, this rank's
    files of the lost save and its temp file are gone, the save's later jobs are dropped, and the marker that
    tells rank 0's commit to stop waiting is left."""
    import torch

    from pipeline.checkpoint.writer import BackgroundWriter

    folder = small_disk("checkpoints", 256) / "step_00000004"
    folder.mkdir()
    writer = BackgroundWriter(background=background)
    writer.folder, writer.rank = folder, 1
    writer.save({"w": torch.ones(1000)}, str(folder / "model_states.pt"))  # 4 KB: fits
    writer.save({"w": torch.ones(200_000)}, str(folder / "optim_states.pt"))  # 800 KB: does not
    ran = []
    writer.submit(lambda: ran.append("commit"))
    message, primary = writer.take_failure()
    assert re.fullmatch(rf"checkpoint {folder}: writing optim_states\.pt: no space left on the device of {folder} "
                        rf"\(needs about 781\.2 KiB, [\d.]+ KiB free\)", message), message
    assert primary and ran == [] and not writer.failed
    assert sorted(p.name for p in folder.iterdir()) == ["failed_rank00001"]
