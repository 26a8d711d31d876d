"""The run report (matplotlib charts and report.md from metrics.jsonl) and the console during a run (the
pipeline's own lines; the rest in run_dir/logs/)."""
from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, error_lines, run_cli, write_jsonl

from pipeline.observe.report import load_metrics, overview_figure, save_png, stage_figure, write_report

RUN = "exp1"


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG, checking its signature, every chunk's CRC and that it has pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, tags, text = 8, [], {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body), path
        tags.append(tag)
        if tag == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert tags[0] == b"IHDR" and tags[-1] == b"IEND" and b"IDAT" in tags, path
    return text


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def line(ax, label: str):
    found = [artist for artist in ax.get_lines() if artist.get_label() == label]
    assert len(found) == 1, (label, [a.get_label() for a in ax.get_lines()])
    return found[0]


def base_records() -> list[dict]:
    """A pretrain of 50 steps (a resumed run logs step 50 again) and a finetune of 3, as the stages log them."""
    lines = [{"stage": "pretrain", "step": s, "loss": 5.0 - 3.0 * s / 50, "lr": 1e-3 * min(1, s / 10),
              "tokens_per_s": 1000.0 + s, "mfu": None, "tokens_seen": 512 * s} for s in range(1, 51)]
    lines += [{"stage": "pretrain", "step": s, "val_loss": 5.1 - 3.0 * s / 50} for s in range(10, 51, 10)]
    lines += [{"stage": "pretrain", "step": 50, "loss": 1.9, "lr": 1e-3, "tokens_per_s": 1050.0,
               "tokens_seen": 25600}]  # the later record of a step counts
    lines += [{"stage": "finetune", "step": s, "loss": 1.0 / s, "lr": 1e-4, "tokens_per_s": 900.0, "mfu": 0.3}
              for s in (1, 2, 3)]
    lines += [{"stage": "pretrain", "step": s, "checkpoint_blocked_s": b, "checkpoint_complete_s": 3 * b}
              for s, b in ((20, 0.5), (40, 0.25), (50, 0.75))]
    lines += [{"stage": "finetune", "step": 3, "exact_match": 0.75, "exact_match_correct": 3,
               "exact_match_total": 4, "exact_match_when": "after"},
              {"stage": "finetune", "step": 3, "checkpoint_blocked_s": 0.1, "checkpoint_complete_s": 0.2}]
    return lines


def metrics_file(run_dir: Path, records: list[dict], cut_short: bool = True) -> Path:
    path = write_jsonl(run_dir / "metrics.jsonl", records)
    if cut_short:
        with open(path, "a") as f:
            f.write('{"stage": "pretrain", "st')  # a crash cut the last line short
    return path


# -- report: files ----------------------------------------------------------------------------------

def test_report_charts_are_matplotlib_pngs_and_report_md_has_the_final_losses(tmp_path):
    path = metrics_file(tmp_path, base_records())
    proc = subprocess.run([sys.executable, "-m", "pipeline.observe.report", f"run_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "report"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "finetune-checkpoints.png", "finetune-loss.png", "finetune-lr.png", "finetune-mfu.png",
        "finetune-tokens_per_s.png", "overview.png", "pretrain-checkpoints.png", "pretrain-loss.png",
        "pretrain-lr.png", "pretrain-tokens_per_s.png"]  # no MFU known for pretrain
    for png in out.glob("*.png"):
        assert png_text(png).get("Software", "").startswith("Matplotlib version"), png
    assert not list(out.glob("*.tmp"))
    report = (out / "report.md").read_text()
    assert "final train loss 1.9000 at step 50" in report and "final val loss 2.1000 at step 50" in report
    assert "tokens seen: 25,600" in report and "exact match (after): 0.750 (3/4)" in report
    assert "checkpoint saves: 3; training blocked median 0.5 s (max 0.75 s); complete after median 1.5 s" in report
    assert "![pretrain loss](pretrain-loss.png)" in report and f"`{path}`" in report
    assert "![overview](overview.png)" in report and "![finetune mfu](finetune-mfu.png)" in report
    assert "| pretrain | running or stopped | 50 | 1.9000 | 2.1000 (2.1000) | 25,600 |" in report
    # fewer series now (no MFU): the stale chart goes, the others are rewritten
    metrics_file(tmp_path, [{**r, "mfu": None} if "mfu" in r else r for r in base_records()])
    write_report(tmp_path)
    assert not (out / "finetune-mfu.png").exists() and (out / "finetune-loss.png").exists()
    proc = subprocess.run([sys.executable, "-m", "pipeline.observe.report", f"run_dir={tmp_path / 'none'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "does not exist" in proc.stderr


def test_a_report_that_cannot_be_written_is_only_a_warning(tmp_path, caplog):
    from pipeline.observe.report import report_at_end

    caplog.set_level(logging.INFO)
    (tmp_path / "report").write_text("a file where the report folder goes")
    report_at_end(tmp_path)
    assert any(r.levelname == "WARNING" and "report: not written" in r.message for r in caplog.records)
    assert any("run finished: artifacts in" in r.message for r in caplog.records)
    proc = subprocess.run([sys.executable, "-m", "pipeline.observe.report", f"run_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "cannot write the report" in proc.stderr


def test_a_report_of_a_run_that_has_logged_nothing_yet(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": "pretrain", "step": 1, "lo')  # cut short at once
    report = write_report(tmp_path).read_text()
    assert "No training metrics yet" in report and not list((tmp_path / "report").glob("*.png"))


# -- report: what each chart holds (the Figure's artists, before it is drawn) ------------------------

def test_loss_chart_names_run_stage_axes_and_series(tmp_path):
    run = load_metrics(metrics_file(tmp_path, base_records()))
    figure = stage_figure("loss", run.stages["pretrain"], RUN)
    ax = figure.axes[0]
    assert ax.get_title() == "exp1 · pretrain: loss"
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats per token)"
    assert legend(ax) == ["train", "validation"]
    train, val = line(ax, "train"), line(ax, "validation")
    assert list(train.get_xdata()) == list(range(1, 51)) and train.get_ydata()[-1] == 1.9
    np.testing.assert_allclose(train.get_ydata()[:49], [5.0 - 3.0 * s / 50 for s in range(1, 50)])
    assert list(val.get_xdata()) == [10, 20, 30, 40, 50]
    assert all(g.get_visible() for g in ax.get_xgridlines() + ax.get_ygridlines())
    tokens = [child for child in ax.child_axes if child.get_xlabel() == "tokens seen"]
    assert len(tokens) == 1  # the same steps in tokens (512 per step), on top
    assert stage_figure("loss", run.stages["finetune"], RUN).axes[0].get_title() == "exp1 · finetune: loss"
    save_png(figure, tmp_path / "loss.png")
    assert png_text(tmp_path / "loss.png")["Software"].startswith("Matplotlib version")


def test_lr_throughput_mfu_and_checkpoint_charts(tmp_path):
    run = load_metrics(metrics_file(tmp_path, base_records()))
    pretrain, finetune = run.stages["pretrain"], run.stages["finetune"]
    ax = stage_figure("lr", pretrain, RUN).axes[0]
    assert (ax.get_title(), ax.get_ylabel(), legend(ax)) == ("exp1 · pretrain: learning rate", "learning rate",
                                                            ["learning rate"])
    assert line(ax, "learning rate").get_ydata()[0] == pytest.approx(1e-4)
    ax = stage_figure("tokens_per_s", pretrain, RUN).axes[0]
    assert (ax.get_title(), ax.get_ylabel()) == ("exp1 · pretrain: throughput", "tokens/s")
    assert legend(ax) == ["tokens/s, all ranks", "median 1,026"]  # of 1001..1049 and 1050
    assert list(line(ax, "median 1,026").get_ydata()) == [1025.5, 1025.5]
    assert stage_figure("mfu", pretrain, RUN) is None  # MFU unknown (CPU): no chart
    ax = stage_figure("mfu", finetune, RUN).axes[0]
    assert (ax.get_title(), ax.get_ylabel()) == ("exp1 · finetune: model FLOPs utilization", "MFU (%)")
    assert list(line(ax, "MFU").get_ydata()) == [30.0, 30.0, 30.0]  # a fraction, shown in percent
    ax = stage_figure("checkpoints", pretrain, RUN).axes[0]
    assert (ax.get_title(), ax.get_ylabel()) == ("exp1 · pretrain: checkpoint saves", "seconds")
    assert list(line(ax, "training blocked").get_ydata()) == [0.5, 0.25, 0.75]
    assert list(line(ax, "until complete.json").get_xdata()) == [20, 40, 50]


def test_skipped_updates_and_resumes_are_marked(tmp_path):
    """Skipped updates as the Trainer logs them; a resume as `{"step": N, "resumed_from": folder}`."""
    folder = str(tmp_path / "pretrain" / "checkpoints" / "step_00000004")
    records = [{"stage": "pretrain", "step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "tokens_per_s": 500.0,
                "tokens_seen": 64 * s} for s in (1, 2, 4, 5, 7, 8)]
    records[2:2] = [{"stage": "pretrain", "step": 3, "loss": None, "lr": 1e-3, "tokens_per_s": 480.0,
                     "tokens_seen": 192}]  # a window whose only update was skipped: no loss
    records += [{"stage": "pretrain", "step": 3, "skipped_update": "non-finite loss", "nonfinite_skips": 1},
                {"stage": "pretrain", "step": 6, "skipped_update": "loss spike (30 > 2.5 + 5 × 0.1, the mean and "
                 "std of the last 3 updates)", "spike_skips": 1},
                {"stage": "pretrain", "step": 4, "resumed_from": folder}]
    run = load_metrics(metrics_file(tmp_path, records))
    stage = run.stages["pretrain"]
    ax = stage_figure("loss", stage, RUN).axes[0]
    assert legend(ax) == ["train", "skipped update (2)", "resumed at step 4"]
    skipped = [c for c in ax.collections if c.get_label() == "skipped update (2)"]
    assert len(skipped) == 1 and [segment[0][0] for segment in skipped[0].get_segments()] == [3, 6]
    assert list(line(ax, "train").get_xdata()) == [1, 2, 4, 5, 7, 8]  # no point where no loss was logged
    assert list(line(ax, "resumed at step 4").get_xdata()) == [4, 4]
    for kind in ("lr", "tokens_per_s"):  # every chart of the stage shows where it resumed
        assert "resumed at step 4" in legend(stage_figure(kind, stage, RUN).axes[0])
    records.append({"stage": "pretrain", "step": 7, "resumed_from": folder.replace("4", "7")})
    ax = stage_figure("loss", load_metrics(metrics_file(tmp_path, records)).stages["pretrain"], RUN).axes[0]
    assert "resumed (2×)" in legend(ax)
    report = write_report(tmp_path).read_text()
    assert f"- resumed at step 4 from `{folder}`" in report
    assert "- skipped updates: 2, at steps 3, 6 (non-finite loss ×1, loss spike ×1)" in report
    assert "final train loss 2.2000 at step 8" in report


def test_per_source_validation_loss_and_eval_results(tmp_path):
    """Records that later stages will write: `val_loss/<source>` with data mixtures, and the eval stage's."""
    records = [{"stage": "pretrain", "step": s, "loss": 4.0 / s, "lr": 1e-3, "tokens_per_s": 10.0, "tokens_seen": s}
               for s in range(1, 5)]
    records += [{"stage": "pretrain", "step": s, "val_loss": 3.0 / s, "val_loss/web": 3.2 / s,
                 "val_loss/code": 2.5 / s} for s in (2, 4)]
    records += [{"stage": "eval", "source": source, "task": "hellaswag", "metric": "acc_norm", "value": value,
                 "stderr": 0.01} for source, value in (("pretrain", 0.25), ("finetune", 0.3))]
    records += [{"stage": "eval", "source": "finetune", "task": "arc_easy", "metric": "acc", "value": 0.4, "stderr": None},
                {"stage": "eval", "source": "finetune", "task": "hellaswag", "metric": "acc_norm", "value": 0.31,
                 "stderr": 0.012}]  # a rerun: the newest result counts
    run = load_metrics(metrics_file(tmp_path, records))
    assert list(run.stages) == ["pretrain"] and len(run.evals) == 4
    ax = stage_figure("loss", run.stages["pretrain"], RUN).axes[0]
    assert legend(ax) == ["train", "validation", "validation: code", "validation: web"]
    np.testing.assert_allclose(line(ax, "validation: web").get_ydata(), [1.6, 0.8])
    report = write_report(tmp_path).read_text()
    assert "| task | metric | pretrain | finetune |" in report
    assert "| hellaswag | acc_norm | 0.25 ± 0.01 | 0.31 ± 0.012 |" in report
    assert "| arc_easy | acc | – | 0.4 |" in report
    assert "final val loss of web: 0.8000 at step 4" in report


def test_overview_has_a_panel_per_stage_and_chart(tmp_path):
    run = load_metrics(metrics_file(tmp_path, base_records()))
    figure = overview_figure(run, RUN)
    assert figure.get_suptitle() == "exp1: run overview"
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible() and ax.axison]
    for stage in ("pretrain", "finetune"):
        for what in ("loss", "learning rate", "throughput", "checkpoint saves"):
            assert f"{stage}: {what}" in titles
    assert "finetune: model FLOPs utilization" in titles and "pretrain: model FLOPs utilization" not in titles
    empty = [ax for ax in figure.axes if not ax.axison]  # pretrain's MFU panel: said, not drawn
    assert len(empty) == 1 and empty[0].texts[0].get_text() == "pretrain: no model FLOPs utilization logged"


# -- console ------------------------------------------------------------------------------------------

NOISY = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from pipeline.observe import console

    run_dir, rank, debug = Path(sys.argv[1]), None if sys.argv[2] == "none" else int(sys.argv[2]), sys.argv[3] == "1"
    console.setup(run_dir, rank, debug)
    log = logging.getLogger("pipeline.demo")
    log.info("demo: a stage line")
    log.warning("demo: the same warning")
    log.warning("demo: the same warning")
    logging.getLogger("compilers.C.base").info("gcc -c /tmp/demo/test.c -o /tmp/demo/test.o")  # as distutils logs
    subprocess.run(["sh", "-c", "echo gcc /tmp/demo/test.o -laio; echo ld: cannot find -laio >&2"])  # a child
    os.write(2, b"c++: written to descriptor 2\\n")
    print("a library print")
    warnings.warn_explicit("`all_gather_into_tensor` is deprecated", FutureWarning,
                           "/site-packages/torch/distributed/c10d_logger.py", 83)
    warnings.warn_explicit("a warning of our own", UserWarning, str(Path(console.__file__).parent / "data.py"), 9)
    with console.console_for_local_ranks():  # what local ranks inherit
        subprocess.run(["sh", "-c", "echo child on the console, named=$PIPELINE_CONSOLE_LOG_NAMED"])
    sys.stderr.write("progress 50%\\r")
    sys.stderr.write("error: the one error line\\n")
""")


def noisy(run_dir: Path, rank: str, debug: str) -> tuple[str, str]:
    proc = subprocess.run([sys.executable, "-c", NOISY, str(run_dir), rank, debug], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


COMPILER = ("gcc -c /tmp/demo/test.c", "gcc /tmp/demo/test.o", "ld: cannot find -laio", "c++: written to descriptor 2")


def test_console_keeps_the_pipeline_lines_and_the_log_file_the_rest(tmp_path):
    out, err = noisy(tmp_path, "none", "0")
    log_file = tmp_path / "logs" / "pipeline.log"
    assert out.count("log: ") == 1 and f"log: {log_file}" in out
    assert "demo: a stage line" in out and out.count("warning: demo: the same warning") == 1
    assert "warning: a warning of our own (UserWarning: data.py:9)" in out
    assert "child on the console, named=1" in out  # the ranks get the console, and do not name the log again
    assert "progress 50%" in err and error_lines(subprocess.CompletedProcess([], 0, out, err)) == [
        "error: the one error line"]
    console = out + err
    for noise in (*COMPILER, "a library print", "FutureWarning", "all_gather_into_tensor"):
        assert noise not in console, noise
    text = log_file.read_text()
    for kept in (*COMPILER, "a library print", "FutureWarning: `all_gather_into_tensor` is deprecated",
                 "demo: a stage line", "a warning of our own"):
        assert kept in text, kept
    assert text.count("demo: the same warning") == 2 and "child on the console" not in text


def test_other_ranks_keep_their_lines_in_their_own_log(tmp_path):
    out, err = noisy(tmp_path, "1", "0")
    assert "demo:" not in out + err and "log: " not in out  # rank 0 speaks for the ranks
    assert "error: the one error line" in err  # errors are the entry point's, on every rank
    text = (tmp_path / "logs" / "rank1.log").read_text()
    assert "demo: a stage line" in text and "gcc /tmp/demo/test.o" in text and "FutureWarning" in text
    out, err = noisy(tmp_path, "0", "0")  # rank 0 of an external launcher (torchrun, srun) names the logs
    assert out.count("log: ") == 1 and f"log: {tmp_path / 'logs' / 'rank<N>.log'}, one per rank" in out
    assert "demo: a stage line" in out and "gcc" not in out + err


def test_debug_shows_everything_on_the_console(tmp_path):
    out, err = noisy(tmp_path, "1", "1")
    console = out + err
    for noise in (*COMPILER, "a library print", "FutureWarning"):
        assert noise in console, noise
    assert console.count("demo: the same warning") == 2
    assert "demo: a stage line" in (tmp_path / "logs" / "rank1.log").read_text()  # the log file is still written


@pytest.mark.slow
def test_a_run_on_two_ranks_has_a_quiet_console(tmp_path, small_run):
    """A real pretrain on 2 local ranks (ZeRO 2, as the default run): DeepSpeed's op-build compiler lines,
    torch's FutureWarning raised inside DeepSpeed and the second rank's copy of each warning are in the logs,
    not on the console; a failure in the ranks is still one error line."""
    from test_pretrain import TINY, fresh_run

    run_dir = fresh_run(small_run, tmp_path / "run")
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "train.max_steps=4", "train.eval_interval=4",
                   "train.save_interval=4", "train.eval_batches=1000", "launch.nproc_per_node=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    console = proc.stdout + proc.stderr
    logs = run_dir / "logs"
    assert console.count("log: ") == 1 and f"log: {logs / 'pipeline.log'}" in proc.stdout
    assert "2 ranks ×" in proc.stdout and "pretrain: step=4 loss=" in proc.stdout
    assert "test.c" not in console and not any(line.startswith("gcc") for line in console.splitlines())
    assert "FutureWarning" not in console and "[WARNING]" not in console, console[-3000:]
    warnings = [line for line in console.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(set(warnings)) and sum("eval: the val split holds only" in w for w in warnings) == 1
    ranks = [(logs / f"rank{rank}.log").read_text() for rank in (0, 1)]
    for text in ranks:
        assert "FutureWarning" in text and "eval: the val split holds only" in text
    if shutil.which("gcc"):  # DeepSpeed checks for its ops' libraries by compiling a test.c
        assert all("test.c" in text for text in ranks)
    # both ranks refuse a folder that is no checkpoint: one error line, the launcher's own report in the log
    proc = run_cli(f"run_dir={run_dir}", "stages=[pretrain]", *TINY, "train.max_steps=6", "force=true",
                   f"train.resume={run_dir / 'shards'}", "launch.nproc_per_node=2", timeout=300)
    assert proc.returncode != 0 and len(error_lines(proc)) == 1, proc.stderr[-3000:]
    assert "refusing to resume from" in error_lines(proc)[0]
    assert "exitcode" not in proc.stdout + proc.stderr and "exitcode" in (logs / "pipeline.log").read_text()
    assert error_lines(proc)[0] in (logs / "rank0.log").read_text()  # the log ends as the console did
