"""bench/common.py: rows of bench/RESULTS.md and the process-tree memory sampler."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402


def test_record_creates_the_header_and_appends_dated_rows(tmp_path, monkeypatch, capsys):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(common, "RESULTS", results)
    common.record("python bench/x.py --a", {"tok/s": "1,000", "load": "0.5"}, hw="test box")
    common.record("python bench/x.py", [{"a": "1"}, "free text; b 2"], hw="test box")
    lines = results.read_text().splitlines()
    assert lines[0] == "# Benchmark results" and "| date | hardware | command | figures |" in lines
    rows = [line for line in lines if line.startswith("| 20")]
    assert rows[0].endswith("| test box | `python bench/x.py --a` | tok/s 1,000; load 0.5 |")
    assert rows[1].endswith("| a 1 |") and rows[2].endswith("| free text; b 2 |")
    assert rows[1].split("|")[1] == rows[2].split("|")[1]  # one call, one date
    assert "appended 2 rows to" in capsys.readouterr().out
    assert "CPUs" in common.hardware() and "GiB RAM" in common.hardware()


@pytest.mark.slow
def test_memory_sampler_sums_a_process_tree():
    # a child holding 200 MB under a parent: the tree's peak counts it, the parent's own RSS does not
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; x = bytes(200 << 20) + b\"x\"; time.sleep(3)'])")  # + b"x": a written copy
    proc = subprocess.Popen([sys.executable, "-c", code])
    tree = common.MemorySampler(pid=proc.pid, tree=True, interval=0.02)
    alone = common.MemorySampler(pid=proc.pid, interval=0.02)
    proc.wait()
    time.sleep(0.05)
    assert tree.stop() > 200 and alone.stop() < 100, (tree.peak, alone.peak)
