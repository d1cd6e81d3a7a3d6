"""The HTML page of trainlab.compare: one self-contained file (inline CSS, JS and SVG; nothing
fetched), to open offline or share.

The table has a column per swept value and per metric, sorts on a click on any heading, links
each run's directory (relative to the page) and draws each run's curve of the monitored metric;
a parallel-coordinates chart draws every setting as a line through its swept values to the
ranked metric, coloured from worst to best.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{cursor:pointer;background:#f4f4f4}th:hover{background:#e4e4e4}"
    "td.runs a{margin-right:.5em}img{max-width:100%;margin:1em 0}"
    "svg text{font:11px sans-serif}polyline.run:hover{stroke-width:4}"
)

# A click on a heading sorts the table by it (numbers as numbers); a second click reverses.
SORT_JS = """
document.querySelectorAll('table.runs th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], down = th.dataset.order !== 'asc';
  th.dataset.order = down ? 'asc' : 'desc';
  const key = r => r.cells[i].dataset.v ?? r.cells[i].textContent;
  [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
    return down ? c : -c;
  }).forEach(r => body.appendChild(r));
}));
"""


# What a leaderboard cell says, on the page and in the terminal (trainlab.engine.compare).


def lower_is_better(runs: list[Any], metric: str) -> bool:
    """As the mode of the monitor of runs that monitor `metric` says; for any other metric, a
    guess from its name."""
    for run in runs:
        name = run.monitor.get("metric")
        if name and metric in (name, f"{name}_best"):
            return run.monitor.get("mode") == "min"
    return "loss" in metric or "error" in metric


def columns_of(metric: str) -> list[str]:
    """The ranked metric, its test split's counterpart (val/acc_best: test/acc) and val/loss."""
    tested = metric.removesuffix("_best").replace("val/", "test/", 1)
    return list(dict.fromkeys([metric, tested, "val/loss"]))


def fmt(value: tuple[float, float, int] | None, n: int) -> str:
    """A leaderboard cell: the mean (+- std) over the `count` runs of the n in its setting that
    have the value."""
    if value is None:
        return "-"
    mean, std, count = value
    text = f"{mean:.4f} +- {std:.4f}" if count > 1 else f"{mean:.4f}"
    return text if count == n else f"{text} ({count} of {n} runs)"


def progress_of(run: Any) -> str:
    metric = run.monitor.get("metric")
    history = run.history(metric) if metric else []
    return f"at epoch {history[-1][0] + 1}, {metric} {history[-1][1]:.4f}" if history else ""


def swept(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(key, each row's value) for each key the settings differ in, in command-line order."""
    values: dict[str, list[str]] = {}
    for n, row in enumerate(rows):
        for o in row["runs"][0].group:
            if o in row["shared"]:
                continue
            key, _, value = o.partition("=")
            values.setdefault(key.lstrip("+~"), [""] * len(rows))[n] = value
    return list(values.items())


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _link(run: Any, folder: Path) -> str:
    href = quote(Path(os.path.relpath(run.dir.resolve(), folder.resolve())).as_posix()) + "/"
    where, name = html.escape(str(run.dir)), html.escape(run.dir.name)
    return f'<a href="{href}" title="{where}">{name}</a>'


def _spark(runs: list[Any], curve: str, width: int = 140, height: int = 32) -> str:
    """Each run's `curve` by epoch as a small line (repeats of a setting: one line each)."""
    histories = [h for h in (run.history(curve) for run in runs) if h]
    if not histories:
        return ""
    points = [p for h in histories for p in h]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)

    def xy(epoch: float, value: float) -> str:
        x = 2 + (width - 4) * ((epoch - x0) / (x1 - x0) if x1 > x0 else 0.5)
        y = height - 2 - (height - 4) * ((value - y0) / (y1 - y0) if y1 > y0 else 0.5)
        return f"{x:.1f},{y:.1f}"

    lines = "".join(
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" '
        f'points="{" ".join(xy(e, v) for e, v in h)}"/>'
        for h in histories
    )
    last = histories[0][-1]
    tip = f"{curve}: epochs {int(x0) + 1} to {int(x1) + 1}, last {last[1]:.4f}"
    return f'<svg width="{width}" height="{height}"><title>{html.escape(tip)}</title>{lines}</svg>'


def _axis(values: list[str]) -> tuple[Any, list[tuple[float, str]]]:
    """(position in [0, 1] of a value, ticks): numbers on a linear or, over a decade or more
    of positive values, a log scale; anything else as evenly spaced categories."""
    numbers = [_number(v) for v in values if v != ""]
    if numbers and all(n is not None for n in numbers):
        lo, hi = min(numbers), max(numbers)
        log = lo > 0 and hi / lo >= 10
        f = math.log10 if log else (lambda v: v)
        span = f(hi) - f(lo)

        def at(v: str) -> float | None:
            n = _number(v)
            return None if n is None else (0.5 if span == 0 else (f(n) - f(lo)) / span)

        return at, [(at(str(n)), f"{n:g}") for n in sorted(set(numbers))]
    categories = sorted({v for v in values if v != ""})
    step = 1 / max(1, len(categories) - 1)

    def place(v: str) -> float | None:
        return (categories.index(v) * step if len(categories) > 1 else 0.5) if v else None

    return place, [(place(c), c) for c in categories]


def parallel_coordinates(
    rows: list[dict[str, Any]], keys: list[tuple[str, list[str]]], metric: str, lower: bool
) -> str:
    """An SVG chart: an axis per swept key and one for `metric`, a line per setting."""
    scores = [row[metric][0] for row in rows]
    axes = [*keys, (metric, [f"{s:.6g}" for s in scores])]
    if len(axes) < 2 or not rows:
        return ""
    gap, top, height = 170, 30, 260
    width = gap * (len(axes) - 1) + 160
    lo, hi = min(scores), max(scores)
    parts = []
    placed = []
    for i, (name, values) in enumerate(axes):
        at, ticks = _axis(values)
        x = 80 + gap * i
        parts.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + height}" stroke="#444"/>')
        parts.append(
            f'<text x="{x}" y="{top - 12}" text-anchor="middle" font-weight="bold">'
            f"{html.escape(name)}</text>"
        )
        for pos, label in ticks[:: max(1, len(ticks) // 8)]:
            y = top + height * (1 - pos)
            parts.append(f'<text x="{x - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        placed.append([at(v) for v in values])
    for n, row in enumerate(rows):
        good = (scores[n] - lo) / (hi - lo) if hi > lo else 1.0
        good = 1 - good if lower else good
        points = " ".join(
            f"{80 + gap * i},{top + height * (1 - placed[i][n]):.1f}"
            for i in range(len(axes))
            if placed[i][n] is not None
        )
        tip = f"#{n + 1} {row['overrides']}: {metric} {scores[n]:.4f}"
        parts.append(
            f'<polyline class="run" fill="none" stroke="hsl({120 * good:.0f},70%,42%)" '
            f'stroke-width="2" opacity="0.8" points="{points}"><title>{html.escape(tip)}</title>'
            "</polyline>"
        )
    return (
        f'<svg class="parallel" width="{width}" height="{top + height + 20}">'
        + "".join(parts)
        + "</svg>"
    )


def page(
    folder: Path,
    rows: list[dict[str, Any]],
    others: list[Any],
    metric: str,
    images: list[Path],
    problems: list[Any],
) -> str:
    """The page that compare writes into `folder` (links to the runs are relative to it)."""
    import base64

    columns = columns_of(metric)
    keys = swept(rows)
    runs = [run for row in rows for run in row["runs"]]
    curve = next((r.monitor["metric"] for r in runs if r.monitor.get("metric")), None)
    curve = curve or metric.removesuffix("_best")
    heads = ["#", *(k for k, _ in keys), "runs", *columns, f"{curve} by epoch"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)

    def cell(value: tuple[float, float] | None, n: int) -> str:
        sort = f' data-v="{value[0]!r}"' if value else ""
        return f"<td{sort}>{fmt(value, n)}</td>"

    body = "".join(
        f'<tr title="{html.escape(row["overrides"])}"><td>{i}</td>'
        + "".join(f"<td>{html.escape(values[i - 1])}</td>" for _, values in keys)
        + '<td class="runs">'
        + "".join(_link(run, folder) for run in row["runs"])
        + "</td>"
        + "".join(cell(row.get(c), len(row["runs"])) for c in columns)
        + f"<td>{_spark(row['runs'], curve)}</td></tr>"
        for i, row in enumerate(rows, 1)
    )

    def item(run: Any) -> str:
        return (
            f"<li><b>{html.escape(str(run.status))}</b>: {html.escape(' '.join(run.overrides))} "
            f"{_link(run, folder)} {html.escape(run.error or progress_of(run))}"
            + (f"<br>continue with: <code>{html.escape(run.resume)}</code>" if run.resume else "")
            + "</li>"
        )

    pruned = "".join(item(run) for run in others if run.status == "pruned")
    not_finished = "".join(item(run) for run in others if run.status != "pruned")
    cannot = "".join(
        f"<li><b>{p.kind}</b>: <code>{html.escape(str(p.path))}</code>: {html.escape(p.what)}</li>"
        for p in problems
    )
    pictures = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
        if p.is_file()
    )
    chart = parallel_coordinates(rows, keys, metric, lower_is_better(runs, metric))
    shared = rows[0]["shared"] if rows else []
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>trainlab comparison</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Runs by {html.escape(metric)}</h1>"
        "<p>Click a heading to sort by it; a run's name opens its directory.</p>"
        f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        + (f"<p>All runs: <code>{html.escape(' '.join(shared))}</code></p>" if shared else "")
        + (f"<h2>Swept values against {html.escape(metric)}</h2>{chart}" if chart else "")
        + (f"<h2>Pruned (stopped early by the sweep)</h2><ul>{pruned}</ul>" if pruned else "")
        + (f"<h2>Not finished</h2><ul>{not_finished}</ul>" if not_finished else "")
        + (f"<h2>Problems</h2><ul>{cannot}</ul>" if problems else "")
        + f"{pictures}<script>{SORT_JS}</script></body></html>\n"
    )
