"""Run report: `metrics.jsonl` as matplotlib charts and a `report.md`, the page to open first after a run.

`python -m pipeline.observe.report run_dir=PATH` rebuilds it at any time, also while a run is going (the runner
writes it at the end of every run, on rank 0; a report that cannot be written is a warning, never a
failed run). It writes `run_dir/report/`:

- `overview.png`: the charts below side by side, one row per training stage, for a quick look;
- per training stage `<stage>-loss.png` (train and validation loss, each source's validation loss where
  one is logged, skipped updates marked), `-lr.png`, `-tokens_per_s.png`, `-mfu.png` where MFU is known
  and `-checkpoints.png` (how long each save blocked training, and until it was complete). Every chart
  of a resumed stage marks the step it resumed from;
- `report.md`: the overview, a table of the stages, each stage's figures and charts, the eval stage's
  results as a table, and where the artifacts are.

Charts are matplotlib figures drawn headless (Agg). `stage_figure` and `overview_figure` build a Figure,
`save_png` writes it, so what a chart holds can be checked before it is drawn.
"""
from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..fsutil import atomic_write_bytes
from ..layout import TRAINING_STAGES, RunLayout
from .metrics import read_records

log = logging.getLogger(__name__)

# chart name -> what it shows (titles, report.md)
CHARTS = {"loss": "loss", "lr": "learning rate", "tokens_per_s": "throughput", "mfu": "model FLOPs utilization",
          "checkpoints": "checkpoint saves"}
VAL_SOURCE = "val_loss/"  # per-source validation loss keys: val_loss/<source>
CHART_SIZE = (8.0, 4.5)  # inches, at DPI
PANEL_SIZE = (4.6, 3.2)
DPI = 100
TRAIN, VAL, SKIP, RESUME = "C0", "C1", "C3", "0.35"  # colours (matplotlib's default cycle: blue, orange, red)


# -- metrics ---------------------------------------------------------------------------------------

@dataclass
class StageMetrics:
    """One training stage's records by step; where a step was logged twice (a resumed run), the later
    record counts."""
    name: str
    train: dict[int, dict] = field(default_factory=dict)  # records with `loss` (null where no update applied)
    val: dict[int, dict] = field(default_factory=dict)  # `val_loss`, `val_loss/<source>`
    checkpoints: dict[int, dict] = field(default_factory=dict)  # `checkpoint_blocked_s`, `checkpoint_complete_s`
    skips: dict[int, str] = field(default_factory=dict)  # step -> why its update was skipped
    resumes: list[tuple[int, str]] = field(default_factory=list)  # (step, checkpoint folder)
    other: dict[int, dict] = field(default_factory=dict)  # the rest (exact match ...), merged per step

    def series(self, records: dict[int, dict], key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the records holding a finite number under `key`, by step."""
        pairs = sorted((step, float(r[key])) for step, r in records.items() if _number(r.get(key)))
        return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)

    def sources(self) -> list[str]:
        """The data sources whose validation loss is logged on its own (mixtures)."""
        return sorted({k[len(VAL_SOURCE):] for r in self.val.values() for k in r if k.startswith(VAL_SOURCE)})

    def step_range(self) -> tuple[int, int] | None:
        """The first and last step the stage logged anything at: every chart of the stage spans it."""
        steps = [*self.train, *self.val, *self.checkpoints, *self.skips, *(step for step, _ in self.resumes)]
        return (min(steps), max(steps)) if steps else None

    def tokens_per_step(self) -> float | None:
        """Tokens per step where every train record agrees on it (the x-axis in tokens), else None."""
        ratios = {round(r["tokens_seen"] / step, 6) for step, r in self.train.items()
                  if step > 0 and _number(r.get("tokens_seen"))}
        return ratios.pop() if len(ratios) == 1 else None


@dataclass
class RunMetrics:
    stages: dict[str, StageMetrics]  # training stages, in the order they first appear
    evals: list[dict]  # records of the eval stage: source, task, metric, value, stderr


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_metrics(path: Path) -> RunMetrics:
    """metrics.jsonl, read with metrics.read_records (a line cut short by a crash is skipped)."""
    stages: dict[str, StageMetrics] = {}
    evals: list[dict] = []
    for record in read_records(path):
        stage = str(record.get("stage", "?"))
        if stage == "eval" and "metric" in record:
            evals.append(record)
            continue
        try:
            step = int(record["step"])
        except (KeyError, TypeError, ValueError):
            continue
        metrics = stages.setdefault(stage, StageMetrics(stage))
        if "resumed_from" in record:
            metrics.resumes.append((step, str(record["resumed_from"])))
        elif "skipped_update" in record:
            metrics.skips[step] = str(record["skipped_update"])
        elif "loss" in record:
            metrics.train[step] = record
        elif "val_loss" in record or any(k.startswith(VAL_SOURCE) for k in record):
            metrics.val[step] = record
        elif "checkpoint_blocked_s" in record:
            metrics.checkpoints[step] = record
        else:
            metrics.other.setdefault(step, {}).update(record)
    return RunMetrics(stages=stages, evals=evals)


# -- charts ----------------------------------------------------------------------------------------

def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _text(value: str) -> str:
    """Literal text for matplotlib (a `$` would start math)."""
    return str(value).replace("$", r"\$")


def has_data(kind: str, stage: StageMetrics) -> bool:
    """Whether the stage logged anything for the `kind` chart."""
    if kind == "loss":
        keys = [(stage.train, "loss"), (stage.val, "val_loss")] + [(stage.val, VAL_SOURCE + s) for s in stage.sources()]
    elif kind == "checkpoints":
        keys = [(stage.checkpoints, "checkpoint_blocked_s")]
    else:
        keys = [(stage.train, kind)]
    return any(len(stage.series(records, key)[0]) for records, key in keys)


def _draw_loss(ax, stage: StageMetrics) -> None:
    steps, loss = stage.series(stage.train, "loss")
    val_steps, val = stage.series(stage.val, "val_loss")
    if len(steps):
        ax.plot(steps, loss, color=TRAIN, linewidth=1.6, label="train")
    if len(val_steps):
        ax.plot(val_steps, val, color=VAL, linewidth=1.6, marker="o", markersize=4, label="validation")
    for index, source in enumerate(stage.sources()):
        xs, ys = stage.series(stage.val, VAL_SOURCE + source)
        ax.plot(xs, ys, color=f"C{4 + index % 6}", linewidth=1.2, linestyle="--", marker=".",
                label=_text(f"validation: {source}"))
    if stage.skips:  # a line across the plot at each: the loss of a skipped step may be missing (non-finite)
        skipped = sorted(stage.skips)
        ax.vlines(skipped, 0, 1, transform=ax.get_xaxis_transform(), color=SKIP, linewidth=1.2, alpha=0.7,
                  label=f"skipped update ({len(skipped)})")
    ax.set_ylabel("loss (nats per token)")


def _draw_line(key: str, label: str, ylabel: str, scale: float = 1.0):
    def draw(ax, stage: StageMetrics) -> None:
        steps, values = stage.series(stage.train, key)
        ax.plot(steps, values * scale, color=TRAIN, linewidth=1.6, label=label)
        if key != "lr":
            median = float(np.median(values * scale))
            ax.axhline(median, color=TRAIN, linewidth=1, linestyle="--", alpha=0.6, label=f"median {_short(median)}")
        ax.set_ylabel(ylabel)
    return draw


def _draw_checkpoints(ax, stage: StageMetrics) -> None:
    steps, blocked = stage.series(stage.checkpoints, "checkpoint_blocked_s")
    ax.plot(steps, blocked, color=TRAIN, marker="o", linewidth=1.4, label="training blocked")
    done_steps, complete = stage.series(stage.checkpoints, "checkpoint_complete_s")
    if len(done_steps):
        ax.plot(done_steps, complete, color=VAL, marker="s", linewidth=1.2, linestyle="--",
                label="until complete.json")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds")


DRAW = {"loss": _draw_loss,
        "lr": _draw_line("lr", "learning rate", "learning rate"),
        "tokens_per_s": _draw_line("tokens_per_s", "tokens/s, all ranks", "tokens/s"),
        "mfu": _draw_line("mfu", "MFU", "MFU (%)", scale=100.0),
        "checkpoints": _draw_checkpoints}


def _mark_resumes(ax, stage: StageMetrics) -> None:
    steps = sorted({step for step, _ in stage.resumes})
    for index, step in enumerate(steps):
        label = (f"resumed at step {step}" if len(steps) == 1 else f"resumed ({len(steps)}×)") if index == 0 \
            else "_nolegend_"
        ax.axvline(step, color=RESUME, linestyle=":", linewidth=1.6, label=label)


def draw_chart(ax, kind: str, stage: StageMetrics, title: str, tokens_axis: bool) -> bool:
    """One chart on `ax`; False (and nothing drawn) when the stage logged nothing for it."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    if not has_data(kind, stage):
        return False
    DRAW[kind](ax, stage)
    _mark_resumes(ax, stage)
    ax.set_title(_text(title))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first, last = stage.step_range()
    if last > first:
        margin = (last - first) * 0.02
        ax.set_xlim(first - margin, last + margin)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    per_step = stage.tokens_per_step()
    if tokens_axis and per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
        top.xaxis.set_major_formatter(EngFormatter())
    return True


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # headless: no display, no pyplot state
    return figure


def stage_figure(kind: str, stage: StageMetrics, run_name: str):
    """The `kind` chart (a key of CHARTS) of one stage as a Figure, or None when there is nothing to draw."""
    if not has_data(kind, stage):
        return None
    figure = _figure(CHART_SIZE)
    draw_chart(figure.add_subplot(), kind, stage, f"{run_name} · {stage.name}: {CHARTS[kind]}", True)
    return figure


def overview_figure(run: RunMetrics, run_name: str):
    """Every chart of every training stage as panels (a row per stage), or None when nothing was logged."""
    drawable = {name: [k for k in CHARTS if has_data(k, stage)] for name, stage in run.stages.items()}
    rows = [name for name, kinds in drawable.items() if kinds]
    columns = [k for k in CHARTS if any(k in drawable[name] for name in rows)]
    if not rows:
        return None
    figure = _figure((PANEL_SIZE[0] * len(columns), PANEL_SIZE[1] * len(rows) + 0.4))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row, name in zip(axes, rows):
        for ax, kind in zip(row, columns):
            if not draw_chart(ax, kind, run.stages[name], f"{name}: {CHARTS[kind]}", False):
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{name}: no {CHARTS[kind]} logged", ha="center", va="center",
                        transform=ax.transAxes, color="0.5")
    figure.suptitle(_text(f"{run_name}: run overview"), fontsize="x-large")
    return figure


def save_png(figure, path: Path) -> None:
    """The figure as a PNG (written atomically: a reader never sees half a chart)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


# -- report.md -------------------------------------------------------------------------------------

def _final_val(stage: StageMetrics) -> tuple[int, float, int, float] | None:
    """(step, final val loss, best step, best val loss)."""
    steps, values = stage.series(stage.val, "val_loss")
    if not len(steps):
        return None
    best = int(values.argmin())
    return int(steps[-1]), float(values[-1]), int(steps[best]), float(values[best])


def _final_train(stage: StageMetrics) -> tuple[int, float] | None:
    steps, values = stage.series(stage.train, "loss")
    return (int(steps[-1]), float(values[-1])) if len(steps) else None


def stage_lines(stage: StageMetrics, charts: list[str]) -> list[str]:
    """The stage's report.md section; `charts` are the chart files written for it."""
    lines = [f"## {stage.name}", ""]
    train = stage.train
    if train:
        final = _final_train(stage)
        lines.append(f"- steps logged: {min(train)} to {max(train)} ({len(train)} records)"
                     + (f"; final train loss {final[1]:.4f} at step {final[0]}" if final else ""))
        seen = [r["tokens_seen"] for _, r in sorted(train.items()) if _number(r.get("tokens_seen"))]
        if seen:
            lines.append(f"- tokens seen: {int(seen[-1]):,}")
    val = _final_val(stage)
    if val:
        lines.append(f"- final val loss {val[1]:.4f} at step {val[0]}; best {val[3]:.4f} at step {val[2]}")
    for source in stage.sources():
        steps, values = stage.series(stage.val, VAL_SOURCE + source)
        if len(steps):
            lines.append(f"- final val loss of {source}: {values[-1]:.4f} at step {int(steps[-1])}; best "
                         f"{values.min():.4f}")
    for key, what in (("tokens_per_s", "tokens/s"), ("mfu", "MFU")):
        _, values = stage.series(train, key)
        if len(values):
            lines.append(f"- {what}: median {np.median(values):.4g}, last {values[-1]:.4g}")
    _, blocked = stage.series(stage.checkpoints, "checkpoint_blocked_s")
    _, complete = stage.series(stage.checkpoints, "checkpoint_complete_s")
    if len(blocked):
        lines.append(f"- checkpoint saves: {len(blocked)}; training blocked median {np.median(blocked):.3g} s (max "
                     f"{blocked.max():.3g} s)" + (f"; complete after median {np.median(complete):.3g} s"
                                                  if len(complete) else ""))
    for step, folder in stage.resumes:
        lines.append(f"- resumed at step {step} from `{folder}`")
    if stage.skips:
        reasons: dict[str, int] = {}
        for reason in stage.skips.values():
            kind = reason.split(" (")[0]  # "loss spike (1.2e+03 > ...)" -> "loss spike"
            reasons[kind] = reasons.get(kind, 0) + 1
        lines.append(f"- skipped updates: {len(stage.skips)}, at steps {', '.join(map(str, sorted(stage.skips)))} ("
                     + ", ".join(f"{kind} ×{n}" for kind, n in reasons.items()) + ")")
    matches = sorted((r for r in stage.other.values() if r.get("exact_match") is not None), key=lambda r: r["step"])
    for r in matches:
        lines.append(f"- exact match ({r.get('exact_match_when', 'step ' + str(r['step']))}): {r['exact_match']:.3f} "
                     f"({r.get('exact_match_correct')}/{r.get('exact_match_total')})")
    for name in charts:
        kind = name[len(stage.name) + 1:-len(".png")]
        lines += ["", f"![{stage.name} {kind}]({name})"]
    return lines + [""]


def eval_lines(evals: list[dict]) -> list[str]:
    """The eval stage's results: a row per task and metric, a column per source (the model evaluated);
    the newest record of each counts."""
    if not evals:
        return []
    results: dict[tuple[str, str], dict[str, dict]] = {}
    sources: list[str] = []
    for r in evals:
        source = str(r.get("source", ""))
        if source not in sources:
            sources.append(source)
        results.setdefault((str(r.get("task", "")), str(r["metric"])), {})[source] = r

    def cell(r: dict | None) -> str:
        if r is None or not _number(r.get("value")):
            return "–"
        return f"{r['value']:.4g}" + (f" ± {r['stderr']:.2g}" if _number(r.get("stderr")) else "")

    lines = ["## eval", "", "| task | metric | " + " | ".join(s or "(model)" for s in sources) + " |",
             "| --- | --- |" + " --- |" * len(sources)]
    for (task, metric), by_source in sorted(results.items()):
        lines.append(f"| {task} | {metric} | " + " | ".join(cell(by_source.get(s)) for s in sources) + " |")
    return lines + ["", "± is the standard error the eval stage reports.", ""]


STAGE_ORDER = ("tokenize", "shard", "pretrain", "finetune", "export", "eval")


def _stage_order(name: str) -> tuple[int, str]:
    """The order stages run in; others (shard parts) after the stage they belong to."""
    base = name.split("-")[0]
    return (STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER), name)


def summary_lines(layout: RunLayout, run: RunMetrics) -> list[str]:
    """A row per stage record (stages/*.json) and per training stage that has metrics but no record yet."""
    seconds: dict[str, object] = {}
    for path in sorted(layout.records.glob("*.json")):
        try:
            seconds[path.stem] = json.loads(path.read_text()).get("seconds")
        except (OSError, ValueError):
            seconds[path.stem] = "unreadable"
    names = sorted(list(seconds) + [name for name in run.stages if name not in seconds], key=_stage_order)
    if not names:
        return []
    lines = ["| stage | seconds | steps | final train loss | final val loss (best) | tokens seen |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        stage = run.stages.get(name)
        cells = ["", "", "", ""]
        if stage is not None and stage.train:
            final, val = _final_train(stage), _final_val(stage)
            seen = [r["tokens_seen"] for _, r in sorted(stage.train.items()) if _number(r.get("tokens_seen"))]
            cells = [str(max(stage.train)), f"{final[1]:.4f}" if final else "",
                     f"{val[1]:.4f} ({val[3]:.4f})" if val else "", f"{int(seen[-1]):,}" if seen else ""]
        shown = seconds.get(name, "running or stopped")
        lines.append(f"| {name} | {shown} | " + " | ".join(cells) + " |")
    return lines + [""]


def artifacts(layout: RunLayout) -> list[str]:
    """Where the run's outputs are, those that exist."""
    found = [("tokenizer", layout.tokenizer), ("shards", layout.manifest)]
    for stage in TRAINING_STAGES:
        latest = layout.checkpoints(stage) / "latest"
        name = latest.read_text().strip() if latest.is_file() else None
        found.append((f"{stage} checkpoints", layout.checkpoints(stage) / (name or "")))
    found += [(f"export ({source})", layout.export(source)) for source in TRAINING_STAGES]
    found += [(f"eval ({source})", layout.eval_results(source) / "results.json") for source in TRAINING_STAGES]
    found += [("metrics", layout.metrics), ("resolved config", layout.config), ("stage records", layout.records),
              ("logs (what the console left out)", layout.logs)]
    return [f"- {what}: `{path}`" for what, path in found if path.exists()]


# -- the report ------------------------------------------------------------------------------------

def write_report(run_dir: Path) -> Path:
    """Charts and report.md under run_dir/report/; returns report.md's path."""
    layout = RunLayout.of(run_dir)
    if not layout.run_dir.is_dir():
        raise PipelineError(f"run_dir={layout.run_dir} does not exist: give the run_dir of an earlier run")
    out = layout.report
    out.mkdir(exist_ok=True)
    name = layout.run_dir.name
    run = load_metrics(layout.metrics)
    try:
        import matplotlib  # noqa: F401 (a dependency; an older environment may lack it)
        charts_missing = None
    except ImportError as exc:  # an environment installed before it was a dependency
        charts_missing = f"charts not drawn: {exc} (`pip install matplotlib`)"
        log.warning("report: %s", charts_missing)
    written: dict[str, list[str]] = {stage: [] for stage in run.stages}
    has_overview = False
    if charts_missing is None:
        for stage in run.stages.values():
            for kind in CHARTS:
                figure = stage_figure(kind, stage, name)
                if figure is not None:
                    save_png(figure, out / f"{stage.name}-{kind}.png")
                    written[stage.name].append(f"{stage.name}-{kind}.png")
        overview = overview_figure(run, name)
        if overview is not None:
            save_png(overview, out / "overview.png")
            has_overview = True
    kept = {chart for charts in written.values() for chart in charts} | ({"overview.png"} if has_overview else set())
    for old in out.glob("*.png"):  # charts of an earlier report that this one has no data for
        if old.name not in kept:
            old.unlink(missing_ok=True)
    lines = [f"# Run report: {name}", "", f"`{layout.run_dir}`, written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
             f"rebuild it at any time with `python -m pipeline.observe.report run_dir={layout.run_dir}`.", ""]
    if charts_missing:
        lines += [f"({charts_missing})", ""]
    if has_overview:
        lines += ["![overview](overview.png)", ""]
    lines += summary_lines(layout, run)
    for stage in run.stages.values():
        lines += stage_lines(stage, written[stage.name])
    if not run.stages:
        lines += ["No training metrics yet (metrics.jsonl is written by pretrain and finetune).", ""]
    lines += eval_lines(run.evals)
    lines += ["## Artifacts", "", *artifacts(layout), ""]
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def report_at_end(run_dir: Path) -> None:
    """The runner's last word (rank 0): the report, and where everything is. A report that cannot be
    written is a warning: the run itself succeeded."""
    try:
        where = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 (plotting must never fail a finished run)
        log.warning("report: not written (%s: %s); run `python -m pipeline.observe.report run_dir=%s` to retry",
                    type(exc).__name__, exc, run_dir)
        where = None
    log.info("run finished: artifacts in %s, metrics in %s, report in %s", run_dir, RunLayout.of(run_dir).metrics,
             where or "(not written)")


def main(argv: list[str]) -> int:
    run_dir = "runs/default"  # the pipeline's default run_dir
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key != "run_dir" or not sep or not value:
            sys.stderr.write(f"error: unknown argument {arg!r}: usage: python -m pipeline.observe.report run_dir=PATH\n")
            return 2
        run_dir = value
    try:
        print(write_report(Path(run_dir).expanduser()))
    except PipelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # e.g. a read-only run_dir
        sys.stderr.write(f"error: cannot write the report under {run_dir}/report ({exc.strerror}): {exc.filename}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
