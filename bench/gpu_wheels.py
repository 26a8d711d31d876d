"""The wheels that bench/gpu_suite.sh carries to the H200 machine, and the checks that they suffice.

That machine cannot reach a package index; its image (bench/gpu_image.txt) has torch 2.11 and much
else, but not DeepSpeed, Hydra or OmegaConf. The suite installs the carried wheels with
`pip install --no-index --no-deps --target`, so the set must be complete by itself: every dependency in
pyproject.toml that the benchmarks import, and everything those need in turn (Requires-Dist, for
Python 3.12 on x86-64 Linux), is either in the image or carried, one version each. The versions are
the ones installed on this machine, so that the GPU runs what the CPU tests ran.

  build [--wheels DIR]   make DIR (default .whl/) with pip download / pip wheel (needs PyPI), then check it
  check [--wheels DIR]   check DIR's wheels, or the planned set where DIR does not exist; print how to build
  commands               print the commands that build the wheel set
  installed --wheels DIR on the GPU machine, after the install: the carried versions are the ones
                         imported, the image has what they need, and CUDA works

Prints `error: ...` and exits 1 when the set is inconsistent.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = os.path.dirname(HERE)  # bench/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import zipfile  # noqa: E402
from email.parser import Parser  # noqa: E402
from pathlib import Path  # noqa: E402

from packaging.requirements import Requirement  # noqa: E402
from packaging.tags import Tag, compatible_tags, cpython_tags  # noqa: E402
from packaging.utils import canonicalize_name, parse_wheel_filename  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LIST = ROOT / "bench" / "gpu_image.txt"

# What is carried, and how its wheel is made: "binary" comes from PyPI as a wheel (pip download);
# "sdist" exists there only as source, so `pip wheel --no-deps` builds it here (DeepSpeed's is pure
# Python: its CUDA ops are compiled on the GPU machine at first use, from the sources inside the wheel).
CARRY = {
    "deepspeed": "sdist",
    "hydra-core": "binary",
    "omegaconf": "binary",
    "antlr4-python3-runtime": "sdist",
    "hjson": "binary",
    "pydantic": "binary",
    "pydantic-core": "binary",
    "annotated-types": "binary",
    "typing-inspection": "binary",
    "typing-extensions": "binary",
}
# In the image too, but carried: pydantic needs typing-extensions>=4.14.1, and the image's version is unknown.
CARRIED_OVER_IMAGE = {"typing-extensions"}
# pyproject.toml dependencies the benchmarks do not import (checked: importing them loads none of these).
NOT_NEEDED = {"datasets": "datasets", "wandb": "wandb", "lm-eval": "lm_eval"}  # distribution -> its top-level module
SUITE_MODULES = ["bench.train", "bench.checkpoint", "bench.attention", "bench.memory"]
# The GPU machine: markers of Requires-Dist are evaluated for it, and wheels must carry one of its tags.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"]
# DeepSpeed's FusedAdam (pipeline.train.engine.build_optimizer on CUDA) is compiled there from these.
DEEPSPEED_SOURCES = ["deepspeed/ops/op_builder/fused_adam.py", "deepspeed/ops/csrc/adam/multi_tensor_adam.cu"]


class Inconsistent(Exception):
    pass


def target_tags() -> set[Tag]:
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                        "manylinux1_x86_64", "linux_x86_64"]
    return set(cpython_tags((3, 12), ["cp312", "abi3", "none"], platforms)) | set(
        compatible_tags((3, 12), "cp312", platforms))


def image_packages() -> dict[str, Version | None]:
    """Name -> version (None where the list gives none) of the GPU image's packages."""
    found = {}
    for line in IMAGE_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = Version(version) if version else None
    return found


def pyproject_requirements() -> list[Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise Inconsistent("reading pyproject.toml needs Python 3.11 or later (tomllib)") from None
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(TARGET)


def planned_versions() -> dict[str, Version]:
    """The carried distributions at the versions installed here."""
    versions, absent = {}, []
    for name in CARRY:
        try:
            versions[name] = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            absent.append(name)
    if absent:
        raise Inconsistent(f"{', '.join(absent)} not installed here, so there is no version to carry "
                           f"(install the project first: pip install -e '.[dev]')")
    return versions


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement], set[str]]:
    """(name, version, Requires-Dist, file names) of one wheel."""
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        meta = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise Inconsistent(f"{path.name} has no .dist-info/METADATA")
        message = Parser().parsestr(whl.read(meta).decode())
    requires = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
    return canonicalize_name(message["Name"]), Version(message["Version"]), requires, names


def read_wheels(folder: Path) -> dict[str, tuple[Version, list[Requirement]]]:
    """name -> (version, Requires-Dist) of every wheel in folder, after the checks that need the files."""
    problems, found, tags = [], {}, target_tags()
    for path in sorted(folder.glob("*.whl")):
        try:
            name, version, _, file_tags = parse_wheel_filename(path.name)
            meta_name, meta_version, requires, files = wheel_metadata(path)
        except (ValueError, zipfile.BadZipFile, Inconsistent) as exc:
            problems.append(f"{path.name}: not a readable wheel ({exc})")
            continue
        if (meta_name, meta_version) != (name, version):
            problems.append(f"{path.name}: its METADATA says {meta_name} {meta_version}")
        if not file_tags & tags:
            problems.append(f"{path.name}: built for none of CPython 3.12 on x86-64 Linux's tags")
        if name in found:
            problems.append(f"two wheels of {name} ({found[name][0]} and {version}): pip would refuse the install")
        if name == "deepspeed":
            missing = [f for f in DEEPSPEED_SOURCES if f not in files]
            if missing:
                problems.append(f"{path.name} lacks {', '.join(missing)}: FusedAdam could not be built on the GPU")
        found[name] = (version, requires)
    if not found and not problems:
        problems.append(f"{folder} holds no wheels")
    if problems:
        raise Inconsistent("; ".join(problems))
    return found


def suite_imports() -> set[str]:
    """Top-level modules loaded by importing the suite's bench scripts, in a fresh interpreter."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
            + "".join(f"import {m}; " for m in SUITE_MODULES)
            + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Inconsistent(f"importing {', '.join(SUITE_MODULES)} failed here: {last}")
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def check(folder: Path) -> dict[str, Version]:
    """The consistency checks; returns the carried versions. Raises Inconsistent with every problem found."""
    image = image_packages()
    planned = planned_versions()
    if folder.is_dir():
        wheels = read_wheels(folder)
        source = f"the wheels in {folder}"
    else:
        wheels = {name: (version, [Requirement(r) for r in metadata.requires(name) or []])
                  for name, version in planned.items()}
        source = "the planned set (no wheels built yet)"
    problems = []
    if "torch" in wheels:
        problems.append("a torch wheel is carried: the GPU image's own CUDA build must stay")
    for name in sorted(set(wheels) - set(CARRY) - {"torch"}):
        problems.append(f"{name} {wheels[name][0]} is carried but not planned (bench/gpu_wheels.py CARRY)")
    for name in CARRY:
        if name not in wheels:
            problems.append(f"no wheel of {name}")
        elif wheels[name][0] != planned[name]:
            problems.append(f"{name} {wheels[name][0]} is carried, {planned[name]} is installed here: rebuild the set")

    def covered(req: Requirement, needed_by: str) -> bool:
        """Whether req is met on the GPU machine; a problem is recorded where it is not."""
        name = canonicalize_name(req.name)
        if name in wheels:
            version = wheels[name][0]
        elif name in image:
            version = image[name]
        else:
            problems.append(f"{needed_by} needs {req}: the GPU image lacks it and no wheel carries it")
            return False
        if version is not None and not req.specifier.contains(version, prereleases=True):
            where = "carried" if name in wheels else "in the GPU image"
            problems.append(f"{needed_by} needs {req}, {where} is {version}")
        return True

    # pyproject.toml's dependencies, then what every carried wheel needs: all must be met there.
    needed = set()
    imported = suite_imports()
    for req in filter(applies, pyproject_requirements()):
        name = canonicalize_name(req.name)
        if name in NOT_NEEDED:
            if NOT_NEEDED[name] in imported:
                problems.append(f"the bench scripts import {NOT_NEEDED[name]}, which the GPU image lacks: carry "
                                f"{name} or import it only where used")
            continue
        if covered(req, "pyproject.toml") and name in wheels:
            needed.add(name)
    queue = sorted(needed)
    while queue:
        name = queue.pop()
        for req in filter(applies, wheels[name][1]):
            dep = canonicalize_name(req.name)
            if covered(req, f"{name} {wheels[name][0]}") and dep in wheels and dep not in needed:
                needed.add(dep)
                queue.append(dep)
    for name in sorted(set(CARRY) - needed - CARRIED_OVER_IMAGE):
        if name in wheels:
            problems.append(f"{name} is carried but nothing needs it on the GPU (drop it from CARRY)")
    if problems:
        raise Inconsistent(f"{source}: " + "; ".join(problems))
    return planned


def build_commands(folder: Path, versions: dict[str, Version], python: str = sys.executable) -> list[list[str]]:
    pins = {kind: [f"{name}=={versions[name]}" for name, k in CARRY.items() if k == kind]
            for kind in ("binary", "sdist")}
    download = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        download += ["--platform", platform]
    return [download + ["-d", str(folder), *pins["binary"]],
            [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), *pins["sdist"]]]


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def installed(folder: Path) -> None:
    """On the GPU machine: the carried wheels are what Python imports, the image meets their needs, CUDA works."""
    wheels = read_wheels(folder)
    image = image_packages()
    problems = []
    for name, (version, requires) in wheels.items():
        try:
            found = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not importable (is PYTHONPATH set to the install target?)")
            continue
        if found != version:
            problems.append(f"{name} {found} is imported, the carried wheel is {version} (PYTHONPATH order?)")
        for req in filter(applies, requires):
            dep = canonicalize_name(req.name)
            if dep in wheels:
                continue
            try:
                have = Version(metadata.version(dep))
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed here"
                                + (" though bench/gpu_image.txt lists it" if dep in image else ""))
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, this machine has {have}")
    if problems:
        raise Inconsistent("; ".join(problems))
    import torch

    if not torch.cuda.is_available():
        raise Inconsistent(f"torch {torch.__version__} sees no CUDA device: the suite measures a GPU "
                           f"(on a CPU machine use bash bench/gpu_suite.sh --dry-run)")
    print(f"carried: {', '.join(f'{n} {v}' for n, (v, _) in sorted(wheels.items()))}; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "check", "commands", "installed"])
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl/)")
    args = parser.parse_args()
    folder = args.wheels
    try:
        if args.action == "installed":
            installed(folder)
            return 0
        if args.action == "build":
            if folder.exists() and any(folder.iterdir()):
                raise Inconsistent(f"{folder} is not empty: remove it first, so that no stale wheel is carried")
            folder.mkdir(parents=True, exist_ok=True)
            for command in build_commands(folder, planned_versions()):
                print("+ " + shlex.join(command), flush=True)
                if subprocess.run(command).returncode != 0:
                    raise Inconsistent(f"{command[3]} failed (above): is PyPI reachable?")
        versions = planned_versions()
        if args.action == "commands":
            for command in build_commands(folder, versions, "python"):
                print(shlex.join(command))
            return 0
        check(folder)
    except Inconsistent as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pins = ", ".join(f"{name} {version}" for name, version in versions.items())
    if folder.is_dir():
        print(f"wheel set OK: {len(versions)} wheels, {size_mib(folder):.1f} MiB in {folder} ({pins})")
    else:
        print(f"planned wheel set OK ({pins}); {folder} does not exist yet, build it with:")
        for command in build_commands(folder, versions, "python"):
            print("  " + shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
