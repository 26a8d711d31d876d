"""bench/gpu_suite.sh's dry run and bench/gpu_wheels.py's check of the wheels carried to the GPU machine."""
from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import gpu_wheels  # noqa: E402


def fake_wheel(folder, name: str, version: str, requires: list[str], files=()) -> None:
    """A wheel with just a METADATA (and the named empty files), as pip writes its name."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\n"
                     f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        for path in files:
            whl.writestr(path, "")


@pytest.fixture
def wheel_set(tmp_path, monkeypatch):
    """A folder with one fake wheel per planned distribution, at the version and with the needs installed
    here; the suite's imports are stubbed (the real ones are what the dry-run test checks)."""
    monkeypatch.setattr(gpu_wheels, "suite_imports", lambda: {"torch", "deepspeed", "hydra", "omegaconf"})
    for name in gpu_wheels.CARRY:
        files = gpu_wheels.DEEPSPEED_SOURCES if name == "deepspeed" else ()
        fake_wheel(tmp_path, name, metadata.version(name), metadata.requires(name) or [], files)
    return tmp_path


def test_a_complete_wheel_set_passes(wheel_set):
    assert set(gpu_wheels.check(wheel_set)) == set(gpu_wheels.CARRY)


def test_a_missing_dependency_is_an_error(wheel_set):
    next(wheel_set.glob("pydantic_core-*.whl")).unlink()
    with pytest.raises(gpu_wheels.Inconsistent) as exc:
        gpu_wheels.check(wheel_set)
    # the pin that pydantic's metadata holds is named, and so is the wheel that is not there
    assert "no wheel of pydantic-core" in str(exc.value)
    assert f"needs pydantic-core=={metadata.version('pydantic-core')}: the GPU image lacks it" in str(exc.value)


def test_torch_a_second_version_or_another_version_are_errors(wheel_set):
    fake_wheel(wheel_set, "torch", "2.13.0", [])
    with pytest.raises(gpu_wheels.Inconsistent, match="a torch wheel is carried"):
        gpu_wheels.check(wheel_set)
    next(wheel_set.glob("torch-*.whl")).unlink()
    fake_wheel(wheel_set, "hjson", "0.1", [])
    with pytest.raises(gpu_wheels.Inconsistent, match="two wheels of hjson"):
        gpu_wheels.check(wheel_set)
    next(wheel_set.glob(f"hjson-{metadata.version('hjson')}-*.whl")).unlink()
    installed = metadata.version("hjson")
    with pytest.raises(gpu_wheels.Inconsistent, match=f"hjson 0.1 is carried, {installed} is installed"):
        gpu_wheels.check(wheel_set)


def test_deepspeed_without_its_cuda_sources_is_an_error(wheel_set):
    next(wheel_set.glob("deepspeed-*.whl")).unlink()
    fake_wheel(wheel_set, "deepspeed", metadata.version("deepspeed"), metadata.requires("deepspeed"))
    with pytest.raises(gpu_wheels.Inconsistent, match="FusedAdam could not be built"):
        gpu_wheels.check(wheel_set)


def test_an_uncarried_pyproject_dependency_the_scripts_import_is_an_error(wheel_set, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "suite_imports", lambda: {"torch", "wandb"})
    with pytest.raises(gpu_wheels.Inconsistent, match="the bench scripts import wandb"):
        gpu_wheels.check(wheel_set)


def test_the_planned_set_is_checked_when_no_wheels_are_built(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "suite_imports", lambda: {"torch"})
    assert set(gpu_wheels.check(tmp_path / "absent")) == set(gpu_wheels.CARRY)
    monkeypatch.delitem(gpu_wheels.CARRY, "hjson")
    with pytest.raises(gpu_wheels.Inconsistent, match="deepspeed .* needs hjson: the GPU image lacks it"):
        gpu_wheels.check(tmp_path / "absent")


def test_a_bad_wheel_folder_gives_one_error_line(tmp_path):
    (tmp_path / "junk-1.0-py3-none-any.whl").write_text("not a zip")
    done = subprocess.run([sys.executable, "bench/gpu_wheels.py", "check", "--wheels", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "not a readable wheel" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_dry_run_checks_the_real_imports_and_prints_the_commands():
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wheel set OK" in done.stdout
    for step in ("train-125m", "train-350m", "checkpoint-350m", "attention-350m", "compile-350m"):
        assert step in done.stdout
    assert "bench/train.py --model 350m --seq-len 2048" in done.stdout


@pytest.mark.parametrize("argv, phrase", [(["--budget", "5"], "--budget needs whole seconds"),
                                          (["--frobnicate"], "unknown argument"),
                                          ([], "no output folder")])
def test_bad_suite_arguments_give_one_error_line(argv, phrase):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", "bench/gpu_suite.sh", *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and phrase in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
