"""Compare runs without a server: a leaderboard in the terminal, plots as PNG and one HTML page.

    python -m trainlab.compare logs/train/sweeps/<time> [more sweep or run dirs]
        [--metric val/acc_best] [--out DIR] [--top 5]

It reads what every run directory holds (metrics.json, metrics.csv, .hydra/config.yaml) and
the sweep's sweep.json, so it works on finished sweeps, on sweeps still running, and on
sweeps where some jobs failed (they are listed with their error). Runs that differ only by
their seed are grouped, their metric shown as mean +- std.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainlab.errors import UserError, exit_on_user_error

IGNORED_IN_GROUPS = ("seed=", "hparams_search=")  # what differs between repeats of one setting


@dataclass
class Run:
    dir: Path
    overrides: list[str]
    status: str  # finished, failed, interrupted, running
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if not o.startswith(IGNORED_IN_GROUPS))

    def param(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def history(self, column: str) -> list[tuple[int, float]]:
        """(epoch, value) for each row of metrics.csv where `column` was logged."""
        path = self.dir / "metrics.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return [
                (int(float(row["epoch"])), float(row[column]))
                for row in csv.DictReader(f)
                if row.get(column) and row.get("epoch")
            ]


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under the given sweep directories (or the run directories themselves)."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a directory: give sweep or run directories.")
        jobs = _read_json(path / "sweep.json").get("jobs", {})
        by_dir = {Path(entry["dir"]).name: entry for entry in jobs.values()}
        if _is_run_dir(path):
            candidates = [path]
        else:
            names = {p.name for p in path.iterdir() if _is_run_dir(p)} | set(by_dir)
            candidates = [path / n for n in sorted(names, key=lambda n: (len(n), n))]
        runs += [_load_run(d, by_dir.get(d.name, {})) for d in candidates]
    if not runs:
        raise UserError(f"no runs found under {', '.join(map(str, paths))}.")
    return runs


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.json").is_file() or (path / ".hydra").is_dir())


def _load_run(run_dir: Path, job: dict[str, Any]) -> Run:
    record = _read_json(run_dir / "metrics.json")
    overrides = record.get("overrides") or job.get("overrides") or _hydra_overrides(run_dir)
    status = record.get("status") or job.get("status") or "running"
    if job.get("status") == "failed":  # the launcher saw the process fail
        status = "failed"
    config = {}
    if (run_dir / ".hydra" / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    return Run(
        dir=run_dir,
        overrides=list(overrides),
        status=status,
        error=record.get("error") or job.get("error"),
        metrics={k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))},
        config=config,
    )


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return list(yaml.safe_load(path.read_text()) or [])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def leaderboard(runs: list[Run], metric: str) -> list[dict[str, Any]]:
    """One row per setting (runs equal but for the seed), best first."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        if run.status == "finished" and metric in run.metrics:
            groups.setdefault(run.group, []).append(run)
    # Overrides that every setting shares say nothing about the differences: shown apart.
    shared = set.intersection(*map(set, groups)) if groups else set()
    rows = []
    for group, members in groups.items():
        label = " ".join(o for o in group if o not in shared) or "(defaults)"
        row: dict[str, Any] = {"overrides": label, "runs": members, "shared": sorted(shared)}
        for key in dict.fromkeys([metric, "test/acc", "val/loss"]):
            values = [r.metrics[key] for r in members if key in r.metrics]
            if values:
                row[key] = (
                    statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                )
        rows.append(row)
    rows.sort(key=lambda r: r[metric][0], reverse=not lower_is_better(metric))
    return rows


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "error" in metric


def fmt(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.4f} +- {std:.4f}" if n > 1 else f"{mean:.4f}"


def print_leaderboard(rows: list[dict[str, Any]], others: list[Run], metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    better = "lower" if lower_is_better(metric) else "higher"
    shared = " ".join(rows[0]["shared"]) if rows else ""
    table = Table(
        title=f"runs by {metric} ({better} is better)",
        caption=f"all runs: {shared}" if shared else None,
    )
    columns = list(dict.fromkeys([metric, "test/acc", "val/loss"]))
    for name in ("#", "overrides", "runs", *columns):
        table.add_column(name, justify="left" if name == "overrides" else "right")
    for i, row in enumerate(rows, 1):
        n = len(row["runs"])
        table.add_row(str(i), row["overrides"], str(n), *(fmt(row.get(c), n) for c in columns))
    console = Console(width=max(100, Console().width))
    console.print(table)
    for run in others:
        detail = run.error or _progress(run)
        console.print(
            f"[bold]{run.status}[/bold]: {' '.join(run.overrides)} ({run.dir}) {detail}",
            highlight=False,
            markup=True,
        )


def _progress(run: Run) -> str:
    history = run.history("val/acc")
    return f"at epoch {history[-1][0]}, val/acc {history[-1][1]:.4f}" if history else ""


def plot_lr(runs: list[Run], metric: str, path: Path) -> None:
    """The metric against the learning rate (log axis), one line per batch size."""
    import matplotlib.pyplot as plt

    points: dict[Any, dict[float, list[float]]] = {}
    for run in runs:
        lr, bs = run.param("optimizer.lr"), run.param("data.batch_size")
        if run.status == "finished" and metric in run.metrics and lr is not None:
            points.setdefault(bs, {}).setdefault(float(lr), []).append(run.metrics[metric])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for bs in sorted(points, key=lambda b: (b is None, b)):
        lrs = sorted(points[bs])
        means = [statistics.fmean(points[bs][lr]) for lr in lrs]
        stds = [statistics.stdev(points[bs][lr]) if len(points[bs][lr]) > 1 else 0.0 for lr in lrs]
        ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=f"batch size {bs}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against learning rate")
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], path: Path, top: int) -> None:
    """Validation accuracy and training loss by epoch for the best `top` settings."""
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for row in rows[:top]:
        for j, run in enumerate(row["runs"]):
            label = row["overrides"] if j == 0 else None
            color = f"C{rows.index(row) % 10}"
            acc, loss = run.history("val/acc"), run.history("train/loss_epoch")
            if acc:
                acc_ax.plot(*zip(*acc, strict=True), color=color, label=label, alpha=0.85)
            if loss:
                loss_ax.plot(*zip(*loss, strict=True), color=color, alpha=0.85)
    acc_ax.set(xlabel="epoch", ylabel="val/acc", title=f"validation accuracy, best {top}")
    loss_ax.set(xlabel="epoch", ylabel="train/loss", title="training loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    if rows:
        acc_ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_html(
    path: Path, rows: list[dict[str, Any]], others: list[Run], metric: str, images: list[Path]
) -> None:
    """One page with everything inline (tables, and the PNGs as data URIs): easy to share."""
    columns = list(dict.fromkeys([metric, "test/acc", "val/loss"]))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("#", "overrides", "runs", *columns))
    body = "".join(
        "<tr>"
        + f"<td>{i}</td><td>{html.escape(r['overrides'])}</td><td>{len(r['runs'])}</td>"
        + "".join(f"<td>{fmt(r.get(c), len(r['runs']))}</td>" for c in columns)
        + "</tr>"
        for i, r in enumerate(rows, 1)
    )
    not_finished = "".join(
        f"<li><b>{run.status}</b>: {html.escape(' '.join(run.overrides))} "
        f"<code>{html.escape(str(run.dir))}</code> {html.escape(run.error or _progress(run))}</li>"
        for run in others
    )
    pictures = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>trainlab comparison</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:nth-child(2){text-align:left}img{max-width:100%;margin:1em 0}</style></head><body>"
        f"<h1>Runs by {html.escape(metric)}</h1><table><tr>{head}</tr>{body}</table>"
        + (
            f"<p>All runs: <code>{html.escape(' '.join(rows[0]['shared']))}</code></p>"
            if rows and rows[0]["shared"]
            else ""
        )
        + (f"<h2>Not finished</h2><ul>{not_finished}</ul>" if others else "")
        + f"{pictures}</body></html>\n"
    )


def compare(paths: list[Path], metric: str, out: Path, top: int = 5) -> dict[str, Any]:
    """Print the leaderboard and write lr_sweep.png, curves.png and report.html into `out`."""
    runs = find_runs(paths)
    rows = leaderboard(runs, metric)
    others = [r for r in runs if r.status != "finished"]
    print_leaderboard(rows, others, metric)
    out.mkdir(parents=True, exist_ok=True)
    images = [out / "lr_sweep.png", out / "curves.png"]
    plot_lr(runs, metric, images[0])
    plot_curves(rows, images[1], top)
    write_html(out / "report.html", rows, others, metric, images)
    print(f"plots and report written to {out}")
    return {"runs": runs, "rows": rows, "not_finished": others, "out": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainlab.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--metric", default="val/acc_best", help="sort by (default val/acc_best)")
    parser.add_argument("--out", type=Path, help="where to write (default <first dir>/compare)")
    parser.add_argument("--top", type=int, default=5, help="settings to draw learning curves of")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no window
    with exit_on_user_error():
        result = compare(args.dirs, args.metric, args.out or args.dirs[0] / "compare", args.top)
    if not result["rows"]:
        print(f"error: no finished run has {args.metric}.", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
