"""Run report: `metrics.jsonl` as PNG charts and a short `report.md`, without a plotting library.

`python -m pipeline.report run_dir=PATH` (the runner also does it at the end of every run, on rank 0)
writes `run_dir/report/`: per training stage `<stage>-loss.png` (train loss, and val loss where
evaluated), `-lr.png`, `-tokens_per_s.png` and `-mfu.png` where MFU is known, and `report.md` with
the stages, steps, final losses, tokens seen, throughput and where the artifacts are. The charts come
from a small numpy rasterizer (axes, gridlines at round values with digit labels, polylines) and are
encoded as PNG with zlib.
"""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 16, 30  # plot margins: room for the tick labels
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))  # first series blue, second orange
GRID, AXIS, INK = (225, 225, 225), (60, 60, 60), (40, 40, 40)
# 3×5 glyphs for tick labels, row by row
GLYPHS = {c: int(bits, 2) for c, bits in {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111111100111"}.items()}
SCALE = 2  # pixels per glyph dot


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit RGB PNG of an (height, width, 3) uint8 array."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
    """Round values (1, 2 or 5 × 10^k apart) spanning [lo, hi]."""
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return np.arange(math.floor(lo / step), math.ceil(hi / step) + 1) * step


def label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:  # steps, and round losses, in full
        return str(int(value))
    return f"{value:.3g}"


def draw_text(canvas: np.ndarray, text: str, x: int, y: int, color=INK) -> None:
    """Glyphs with their top-left corner at (x, y); characters without a glyph are left blank."""
    for char in text:
        bits = GLYPHS.get(char, 0)
        for row in range(5):
            for col in range(3):
                if bits >> (14 - row * 3 - col) & 1:
                    canvas[y + row * SCALE:y + (row + 1) * SCALE, x + col * SCALE:x + (col + 1) * SCALE] = color
        x += 4 * SCALE


def text_width(text: str) -> int:
    return len(text) * 4 * SCALE - SCALE


def draw_polyline(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, markers: bool) -> None:
    """Pixel coordinates; 2-pixel lines, with 5×5 squares on the points where `markers`."""
    pts_x, pts_y = [xs[:1]], [ys[:1]]
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        pts_x.append(np.linspace(x0, x1, n))
        pts_y.append(np.linspace(y0, y1, n))
    px, py = np.rint(np.concatenate(pts_x)).astype(int), np.rint(np.concatenate(pts_y)).astype(int)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        canvas[np.clip(py + dy, 0, HEIGHT - 1), np.clip(px + dx, 0, WIDTH - 1)] = color
    if markers:
        for x, y in zip(np.rint(xs).astype(int), np.rint(ys).astype(int)):
            canvas[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = color


def render_chart(series: list[tuple[np.ndarray, np.ndarray]], markers: list[bool]) -> np.ndarray:
    """One chart: gridlines and labels at round values, axes, one polyline per (x, y) series."""
    canvas = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    x_all = np.concatenate([s[0] for s in series]).astype(float)
    y_all = np.concatenate([s[1] for s in series]).astype(float)
    x_lo, x_hi = float(x_all.min()), float(x_all.max())
    y_lo, y_hi = float(y_all.min()), float(y_all.max())
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    y_ticks = nice_ticks(y_lo, y_hi)
    y_lo, y_hi = float(y_ticks[0]), float(y_ticks[-1])  # the axis ends on gridlines
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_px(x, y):
        return (LEFT + (np.asarray(x, float) - x_lo) / (x_hi - x_lo) * plot_w,
                TOP + (y_hi - np.asarray(y, float)) / (y_hi - y_lo) * plot_h)

    for tick in y_ticks:
        _, py = to_px(x_lo, tick)
        row = int(round(float(py)))
        canvas[row, LEFT:WIDTH - RIGHT] = GRID
        text = label(tick)
        draw_text(canvas, text, LEFT - 6 - text_width(text), min(max(row - 5, 0), HEIGHT - 10))
    for tick in x_ticks:
        px, _ = to_px(tick, y_lo)
        col = int(round(float(px)))
        canvas[TOP:HEIGHT - BOTTOM, col] = GRID
        text = label(tick)
        draw_text(canvas, text, min(max(col - text_width(text) // 2, 0), WIDTH - text_width(text)), HEIGHT - BOTTOM + 8)
    canvas[TOP:HEIGHT - BOTTOM + 1, LEFT - 1:LEFT + 1] = AXIS
    canvas[HEIGHT - BOTTOM:HEIGHT - BOTTOM + 2, LEFT - 1:WIDTH - RIGHT] = AXIS
    for (xs, ys), color, marked in zip(series, COLORS, markers):
        px, py = to_px(xs, ys)
        draw_polyline(canvas, px, py, color, marked)
    return canvas


def read_metrics(path: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """stage -> {"train": step -> record, "eval": ..., "other": ...}; the later record of a step counts.
    A line cut short by a crash is skipped."""
    stages: dict[str, dict[str, dict[int, dict]]] = {}
    if not path.is_file():
        return stages
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        kind = "train" if record.get("loss") is not None else "eval" if record.get("val_loss") is not None else "other"
        kinds = stages.setdefault(str(record.get("stage", "?")), {"train": {}, "eval": {}, "other": {}})
        if kind == "other":  # several at one step (a checkpoint, an exact match): one merged record
            kinds[kind].setdefault(step, {}).update(record)
        else:
            kinds[kind][step] = record
    return stages


def column(records: dict[int, dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted((step, r[key]) for step, r in records.items() if isinstance(r.get(key), (int, float)))
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


CHARTS = (("loss", "loss: train (blue), validation (orange)"), ("lr", "learning rate"),
          ("tokens_per_s", "throughput, tokens/s"), ("mfu", "model FLOPs utilization"))


def stage_section(stage: str, kinds: dict, out: Path) -> list[str]:
    """Write the stage's charts; return its report.md lines."""
    train, evals = kinds["train"], kinds["eval"]
    lines = [f"## {stage}", ""]
    if train:
        last = train[max(train)]
        lines.append(f"- steps logged: {min(train)} to {max(train)} ({len(train)} records); final train loss "
                     f"{last['loss']:.4f} at step {max(train)}")
        if last.get("tokens_seen") is not None:
            lines.append(f"- tokens seen: {last['tokens_seen']:,}")
    if evals:
        steps, values = column(evals, "val_loss")
        lines.append(f"- final val loss {values[-1]:.4f} at step {int(steps[-1])}; best {values.min():.4f} "
                     f"at step {int(steps[values.argmin()])}")
    for key, what in (("tokens_per_s", "tokens/s"), ("mfu", "MFU")):
        _, values = column(train, key)
        if len(values):
            lines.append(f"- {what}: median {np.median(values):.4g}, last {values[-1]:.4g}")
    _, blocked = column(kinds["other"], "checkpoint_blocked_s")
    _, complete = column(kinds["other"], "checkpoint_complete_s")
    if len(blocked):
        lines.append(f"- checkpoint saves: {len(blocked)}; training blocked median {np.median(blocked):.3g} s (max "
                     f"{blocked.max():.3g} s); complete after median {np.median(complete):.3g} s")
    matches = sorted((r for r in kinds["other"].values() if r.get("exact_match") is not None), key=lambda r: r["step"])
    for r in matches:
        lines.append(f"- exact match ({r.get('exact_match_when', 'step ' + str(r['step']))}): {r['exact_match']:.3f} "
                     f"({r.get('exact_match_correct')}/{r.get('exact_match_total')})")
    for key, title in CHARTS:
        series = [column(train, key)] + ([column(evals, "val_loss")] if key == "loss" else [])
        series = [s for s in series if len(s[0])]
        if not series:
            continue
        name = f"{stage}-{key}.png"
        atomic_write_bytes(out / name, encode_png(render_chart(series, [len(s[0]) < 30 for s in series])))
        ys = np.concatenate([s[1] for s in series])
        lines.append(f"\n![{stage} {key}]({name})\n\n{title} against step (x: step {int(series[0][0].min())} to "
                     f"{int(max(s[0].max() for s in series))}; y: {ys.min():.4g} to {ys.max():.4g})")
    return lines + [""]


def artifacts(run_dir: Path) -> list[str]:
    """Where the run's outputs are, those that exist."""
    found = [("tokenizer", run_dir / "tokenizer" / "tokenizer.model"), ("shards", run_dir / "shards" / "manifest.json")]
    for stage in ("pretrain", "finetune"):
        latest = run_dir / stage / "checkpoints" / "latest"
        name = latest.read_text().strip() if latest.is_file() else None
        found.append((f"{stage} checkpoints", run_dir / stage / "checkpoints" / (name or "")))
    found += [(f"export ({source})", run_dir / "export" / source) for source in ("pretrain", "finetune")]
    found += [("metrics", run_dir / "metrics.jsonl"), ("resolved config", run_dir / "config.yaml"),
              ("stage records", run_dir / "stages")]
    return [f"- {what}: `{path}`" for what, path in found if path.exists()]


def write_report(run_dir: Path) -> Path:
    """Charts and report.md under run_dir/report/; returns report.md's path."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise PipelineError(f"run_dir={run_dir} does not exist: give the run_dir of an earlier run")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir.name}", "", f"`{run_dir}`, written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    records = sorted(run_dir.glob("stages/*.json"))
    if records:
        lines += ["| stage record | seconds |", "| --- | --- |"]
        for path in records:
            try:
                seconds = json.loads(path.read_text()).get("seconds")
            except ValueError:
                seconds = "unreadable"
            lines.append(f"| {path.stem} | {seconds} |")
        lines.append("")
    stages = read_metrics(run_dir / "metrics.jsonl")
    for stage, kinds in stages.items():
        lines += stage_section(stage, kinds, out)
    if not stages:
        lines += ["No training metrics yet (metrics.jsonl is written by pretrain and finetune).", ""]
    lines += ["## Artifacts", "", *artifacts(run_dir), ""]
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def report_at_end(run_dir: Path) -> None:
    """The runner's last word (rank 0): the report, and where everything is. A report that cannot be
    written is a warning: the run itself succeeded."""
    try:
        where = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 (plotting must never fail a finished run)
        log.warning("report: not written (%s: %s); run `python -m pipeline.report run_dir=%s` to retry",
                    type(exc).__name__, exc, run_dir)
        where = None
    log.info("run finished: artifacts in %s, metrics in %s, report in %s", run_dir, Path(run_dir) / "metrics.jsonl",
             where or "(not written)")


def main(argv: list[str]) -> int:
    run_dir = "runs/default"  # the pipeline's default run_dir
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key != "run_dir" or not sep or not value:
            sys.stderr.write(f"error: unknown argument {arg!r}: usage: python -m pipeline.report run_dir=PATH\n")
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
