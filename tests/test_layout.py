"""The package's architecture, read from the code's own imports: folders stand on floors with no import circle
and nothing pointing up, stages never import each other, and importing a subpackage imports nothing heavy."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "pipeline"
# the top-level modules every folder may stand on (the run's ground)
GROUND = {"config", "errors", "fsutil", "layout", "redaction", "faults"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pipeline modules `path` imports, anywhere in it (lazy imports in functions count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.startswith("pipeline") and candidate in MODULES:
                found.add(candidate)
                break
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def room(module: str) -> str:
    """A subpackage is one room; a top-level module is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or MODULES[module].name == "__init__.py" and len(parts) == 2 else parts[-1]


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_graph_is_read():
    # the check below must see real arrows: a reader that finds none would pass everything
    assert "pipeline.data.vocab" in GRAPH["pipeline.stages.tokenize"]
    assert "pipeline.checkpoint.store" in GRAPH["pipeline.train.checkpointing"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_between_modules():
    assert find_cycle(GRAPH) == []


def test_no_import_circle_between_folders():
    # a circle between rooms means some import runs back up a floor
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    assert find_cycle(rooms) == []


def test_ground_modules_import_no_folder():
    for name in GROUND:
        assert all(room(t) in GROUND for t in GRAPH[f"pipeline.{name}"]), name


def test_stages_never_import_each_other():
    for module, targets in GRAPH.items():
        if module.startswith("pipeline.stages.") and not module.endswith(".context"):
            stages = {t for t in targets if t.startswith("pipeline.stages.") and not t.endswith((".context", "stages"))}
            assert not stages, f"{module} imports {stages}"


def test_data_side_does_not_import_training():
    for module, targets in GRAPH.items():
        if module.startswith("pipeline.data."):
            assert not {t for t in targets if t.startswith(("pipeline.train", "pipeline.stages"))}, module


def test_the_top_level_is_small_and_no_module_is_long():
    top = [p for p in PACKAGE.glob("*.py")]
    folders = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 12 and len(folders) >= 5
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_importing_a_subpackage_imports_no_torch():
    # each __init__.py is a docstring: `import pipeline.train` must stay cheap for tools that only list things
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "conf")
    code = (f"import sys; import {', '.join('pipeline.' + f for f in folders)}; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_installs_every_subpackage_and_config(tmp_path):
    """Built as a user gets it (not editable), installed into a fresh environment, run from another folder: a
    subpackage or config missing from the wheel fails here."""
    source = tmp_path / "source"  # the files a clean checkout has: no build/ left over from an earlier build
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path)
    env_dir = tmp_path / "env"
    # the dependencies come from this interpreter's site-packages; the wheel's own copy of pipeline comes first
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point back at the checkout
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--ignore-installed", *map(str, wheels.glob("*.whl"))],
                   check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, check=True, cwd=elsewhere, env=clean).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where
    job = subprocess.run([python, "-m", "pipeline", "--cfg", "job", "model=125m", "deepspeed=zero3"],
                         capture_output=True, text=True, cwd=elsewhere, env=clean)
    assert job.returncode == 0, job.stderr
    assert "stages:" in job.stdout and "dim: 768" in job.stdout
    installed = Path(where).parent
    shipped = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.suffix in (".py", ".yaml")}
    ours = {str(p.relative_to(PACKAGE)) for p in MODULES.values()}
    ours |= {str(Path("conf") / p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert ours <= shipped, sorted(ours - shipped)
