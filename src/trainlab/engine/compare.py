"""Compare runs without a server: a leaderboard in the terminal, plots as PNG and one HTML page.

    python -m trainlab.compare logs/ [more folders] [--metric val/f1] [--out DIR] [--top 5]

It finds every run and sweep at or below the folders it is given, and reads what every run
directory holds (metrics.json, metrics.csv, .hydra/config.yaml) and each sweep's sweep.json,
so it works on finished sweeps, on sweeps still running, stopped or dead, and on sweeps where
some jobs failed (listed with their error; interrupted and pending jobs with the command that
continues them). A record it cannot read is named with what is wrong, never skipped. Runs that
differ only by their seed are grouped, their metric shown as mean +- std over the runs that
have it, and "(k of n runs)" where only k of the setting's n runs do.

Runs are ranked by the metric their config's `monitor` names: by each run's best value of it
(metrics.json's monitor.best, shown as e.g. val/acc_best), best first as monitor.mode says.
`--metric` ranks by any other metric in metrics.json instead. Runs without validation
(data.val_size=0) have no val/ metric: they are ranked by its test split's counterpart
(val/acc_best: test/acc), apart from the others, and the output says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra_plugins.trainlab_sweeps.process_launcher import SUMMARY_FILE, sweep_status
from trainlab.engine import stopping
from trainlab.engine.commands import override, train_command
from trainlab.engine.compare_page import columns_of, fmt, lower_is_better, progress_of
from trainlab.engine.config import is_bookkeeping
from trainlab.engine.errors import UserError, exit_on_user_error

# What differs between repeats of one setting, besides the bookkeeping keys (config.BOOKKEEPING)
IGNORED_IN_GROUPS = ("seed", "hparams_search", "hydra")


@dataclass
class Run:
    dir: Path
    overrides: list[str]
    status: str  # finished, failed, interrupted, pending, running, unreadable
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    resume: str | None = None  # the command that continues it (interrupted or pending)
    monitor: dict[str, Any] = field(default_factory=dict)  # metric, mode, best: see _monitor

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if not _ignored_in_groups(o))

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


@dataclass
class Problem:
    """A record that could not be read, or a sweep that died: listed, never dropped."""

    path: Path
    what: str
    kind: str = "unreadable"  # or "died": a sweep whose process is gone


def _ignored_in_groups(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return is_bookkeeping(key) or key.split(".")[0].split("/")[0] in IGNORED_IN_GROUPS


def find_runs(paths: list[Path]) -> tuple[list[Run], list[Problem]]:
    """Every run at or below the given folders (runs, sweeps, or any folder holding them, such
    as logs/), and what could not be read there."""
    runs: list[Run] = []
    problems: list[Problem] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a directory: give run, sweep or log directories.")
        for found in _walk(path):
            if _is_sweep_dir(found):
                runs += _load_sweep(found, problems)
            else:
                runs.append(_load_run(found, {}, problems))
    if not runs and not problems:
        raise UserError(
            f"no runs found under {', '.join(map(str, paths))}: a run's directory holds "
            "metrics.json or .hydra/, a sweep's sweep.json or multirun.yaml."
        )
    return runs, problems


def _walk(folder: Path) -> Iterator[Path]:
    """Sweep and run directories at or below `folder`, without looking inside them."""
    if _is_sweep_dir(folder) or _is_run_dir(folder):
        yield folder
        return
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.is_symlink():
            yield from _walk(child)


def _is_sweep_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / "multirun.yaml").is_file()


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.json").is_file() or (path / ".hydra").is_dir())


def _load_sweep(sweep_dir: Path, problems: list[Problem]) -> list[Run]:
    """The sweep's jobs: those in its sweep.json (pending ones too) and the run dirs in it."""
    record = _read_record(sweep_dir / SUMMARY_FILE, problems)
    jobs = record.get("jobs", {})
    by_dir = {Path(entry["dir"]).name: entry for entry in jobs.values() if "dir" in entry}
    names = {p.name for p in sweep_dir.iterdir() if _is_run_dir(p)} | set(by_dir)
    runs = [
        _load_run(sweep_dir / name, by_dir.get(name, {}), problems)
        for name in sorted(names, key=lambda n: (len(n), n))
    ]
    if record and sweep_status(record) == "died":
        launcher = record.get("launcher", {})
        problems.append(
            Problem(
                sweep_dir / SUMMARY_FILE,
                f"the sweep's process (pid {launcher.get('pid')} on {launcher.get('host')}) "
                f"died without recording its end; continue it with: {record.get('resume')}",
                kind="died",
            )
        )
        for run in runs:
            if run.status == "running":  # its job was stopped with it (or is stopping)
                run.status = "interrupted"
    for run in runs:
        if run.status in ("interrupted", "pending") and not run.resume:
            run.resume = record.get("resume")  # continuing the sweep runs it
    return runs


def _load_run(run_dir: Path, job: dict[str, Any], problems: list[Problem]) -> Run:
    """A run from its metrics.json, or from its sweep's entry where that cannot be read."""
    record = _read_record(run_dir / "metrics.json", problems)
    damaged = (run_dir / "metrics.json").is_file() and not record
    source = record or job
    overrides = record.get("overrides") or job.get("overrides") or _hydra_overrides(run_dir)
    status = record.get("status") or job.get("status") or ("unreadable" if damaged else "running")
    if job.get("status") == "failed":  # the launcher saw the process fail
        status = "failed"
    config = {}
    if (run_dir / ".hydra" / "config.yaml").is_file():
        from omegaconf import OmegaConf

        try:
            config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
        except Exception as e:  # any YAML or OmegaConf error: say so, keep the run
            problems.append(Problem(run_dir / ".hydra" / "config.yaml", _first_line(e)))
    resume = job.get("resume")
    if status == "interrupted" and not resume and not job:  # a single run
        again = [o for o in overrides if not o.startswith("resume=")]
        resume = train_command(*again, "resume=auto", override("hydra.run.dir", run_dir))
    error = source.get("error") or job.get("error")
    if not source and not damaged and not any(run_dir.glob("checkpoints/*.ckpt")):
        # e.g. a run killed before it trained (a stop removes such a run's directory)
        error = "no metrics.json and no checkpoint: starting, or ended before it saved anything"
    run = Run(
        dir=run_dir,
        overrides=list(overrides),
        status=status,
        error=error,
        metrics={k: v for k, v in source.items() if "/" in k and isinstance(v, (int, float))},
        config=config if isinstance(config, dict) else {},
        resume=resume,
    )
    run.monitor = _monitor(run, source)
    if run.monitor["best"] is not None:  # ranked as <metric>_best, e.g. val/acc_best
        run.metrics[f"{run.monitor['metric']}_best"] = run.monitor["best"]
    return run


def _monitor(run: Run, record: dict[str, Any]) -> dict[str, Any]:
    """The run's monitored metric, its mode and its best value, as metrics.json records them.
    A record from before `monitor` existed (or from sweep.json) takes them from the config
    (or best.ckpt's monitor then; val/acc, max, by default), and the best value from the
    record's `<metric>_best` or else from metrics.csv."""
    recorded = record.get("monitor")
    if isinstance(recorded, dict) and recorded.get("metric"):
        return {"best": None, **recorded}
    config = run.param("monitor") or run.param("callbacks.checkpoint") or {}
    metric = config.get("metric", config.get("monitor", "val/acc"))
    mode = config.get("mode") or "max"
    if not isinstance(metric, str):
        return {"metric": None, "mode": mode, "best": None}
    values = [value for _, value in run.history(metric)]
    best = run.metrics.get(f"{metric}_best")
    if best is None and values:
        best = min(values) if mode == "min" else max(values)
    return {"metric": metric, "mode": mode, "best": best}


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    except (OSError, yaml.YAMLError, TypeError):
        return []


def _read_record(path: Path, problems: list[Problem]) -> dict[str, Any]:
    """A JSON record; {} where there is none, and {} with a Problem where it is damaged."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        problems.append(Problem(path, f"cannot be read: {e.strerror or e}"))
        return {}
    except ValueError as e:
        problems.append(Problem(path, f"is not valid JSON, truncated or damaged ({e})"))
        return {}
    if not isinstance(data, dict):
        problems.append(Problem(path, "does not hold a JSON object"))
        return {}
    return data


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


def leaderboard(runs: list[Run], metric: str) -> list[dict[str, Any]]:
    """One row per setting (runs equal but for the seed), best first, with the columns of
    columns_of(metric): each (mean, std, how many of the setting's runs have the value)."""
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
        for key in columns_of(metric):
            values = [r.metrics[key] for r in members if key in r.metrics]
            if values:  # over the runs that have the value, and saying how many they are
                row[key] = (
                    statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                    len(values),
                )
        rows.append(row)
    rows.sort(key=lambda r: r[metric][0], reverse=not lower_is_better(runs, metric))
    return rows


def monitored(runs: list[Run]) -> str:
    """What to rank by unless told: the best value of the metric most runs monitor."""
    metrics = Counter(r.monitor["metric"] for r in runs if r.monitor.get("metric"))
    return f"{metrics.most_common(1)[0][0] if metrics else 'val/acc'}_best"


def _monitors_another(run: Run, metric: str) -> bool:
    return run.status == "finished" and metric not in run.metrics and bool(run.monitor["metric"])


def without_validation(runs: list[Run], metric: str) -> tuple[list[Run], str]:
    """The finished runs that lack a val/ `metric` because they validated nothing (no val/
    value at all, as with data.val_size=0) but were tested, and the test metric that stands
    for it (val/acc_best: test/acc)."""
    tested = columns_of(metric)[1]
    if not metric.startswith("val/") or tested == metric:
        return [], tested
    unvalidated = [
        run
        for run in runs
        if run.status == "finished"
        and metric not in run.metrics
        and tested in run.metrics
        and not any(key.startswith("val/") for key in run.metrics)
    ]
    return unvalidated, tested


def print_leaderboard(
    rows: list[dict[str, Any]], others: list[Run], metric: str, lower: bool, problems: list[Problem]
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    better = "lower" if lower else "higher"
    shared = " ".join(rows[0]["shared"]) if rows else ""
    table = Table(
        title=f"runs by {metric} ({better} is better)",
        caption=f"all runs: {shared}" if shared else None,
    )
    columns = columns_of(metric)
    for name in ("#", "overrides", "runs", *columns):
        table.add_column(name, justify="left" if name == "overrides" else "right")
    for i, row in enumerate(rows, 1):
        n = len(row["runs"])
        table.add_row(
            str(i), escape(row["overrides"]), str(n), *(fmt(row.get(c), n) for c in columns)
        )
    console = Console(width=max(100, Console().width))
    console.print(table)
    for run in others:
        detail = escape(f"{' '.join(run.overrides)} ({run.dir}) {run.error or progress_of(run)}")
        console.print(f"[bold]{run.status}[/bold]: {detail}", highlight=False)
        if run.resume:  # on one line, to be copied whole
            console.print(f"  continue with: {escape(run.resume)}", highlight=False, soft_wrap=True)
    for problem in problems:
        text = escape(f"{problem.path}: {problem.what}")
        console.print(f"[bold]{problem.kind}[/bold]: {text}", highlight=False, soft_wrap=True)


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


def plot_curves(rows: list[dict[str, Any]], metric: str, path: Path, top: int) -> None:
    """`metric` (its value each epoch, not its best so far) and training loss by epoch for the
    best `top` settings."""
    import matplotlib.pyplot as plt

    curve = metric.removesuffix("_best")
    fig, (metric_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for row in rows[:top]:
        for j, run in enumerate(row["runs"]):
            label = row["overrides"] if j == 0 else None
            color = f"C{rows.index(row) % 10}"
            values, loss = run.history(curve), run.history("train/loss_epoch")
            if values:
                metric_ax.plot(*zip(*values, strict=True), color=color, label=label, alpha=0.85)
            if loss:
                loss_ax.plot(*zip(*loss, strict=True), color=color, alpha=0.85)
    metric_ax.set(xlabel="epoch", ylabel=curve, title=f"{curve} by epoch, best {top}")
    loss_ax.set(xlabel="epoch", ylabel="train/loss", title="training loss", yscale="log")
    for ax in (metric_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    if rows:
        metric_ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_html(
    path: Path,
    rows: list[dict[str, Any]],
    others: list[Run],
    metric: str,
    images: list[Path],
    problems: list[Problem],
) -> None:
    """One page with everything inline (tables, charts, and the PNGs as data URIs): easy to
    share; see trainlab.engine.compare_page."""
    from trainlab.engine.compare_page import page

    path.write_text(page(path.parent, rows, others, metric, images, problems))


def compare(paths: list[Path], metric: str | None, out: Path, top: int = 5) -> dict[str, Any]:
    """Print the leaderboard (by `metric`, or by the runs' monitor if None) and write
    lr_sweep.png, curves.png and report.html into `out`."""
    runs, problems = find_runs(paths)
    metric = metric or monitored(runs)
    rows = leaderboard(runs, metric)
    lower = lower_is_better(runs, metric)
    unvalidated, tested = without_validation(runs, metric)
    by_test = []  # runs without validation, ranked apart by their test metric
    if unvalidated and not rows:  # none has the metric: rank them all by the test split's
        print(
            f"No run has {metric} (no validation split, e.g. data.val_size=0): ranked by {tested}"
        )
        metric, rows = tested, leaderboard(unvalidated, tested)
    elif unvalidated:
        by_test = leaderboard(unvalidated, tested)
    pruned = [r for r in runs if r.status == "pruned"]  # by an Optuna sweep: listed apart
    others = pruned + [r for r in runs if r.status not in ("finished", "pruned")]
    print_leaderboard(rows, others, metric, lower, problems)
    if by_test:
        print(
            f"Runs without a validation split (e.g. data.val_size=0) have no {metric}: "
            f"{len(unvalidated)} ranked apart by {tested}"
        )
        print_leaderboard(by_test, [], tested, lower, [])
    ranked = {id(run) for row in rows + by_test for run in row["runs"]}
    apart = {
        f"{r.monitor['metric']}_best"
        for r in runs
        if id(r) not in ranked and _monitors_another(r, metric)
    }
    if apart:  # e.g. char_gpt's runs among classifiers': not comparable, so not ranked here
        names = " or ".join(sorted(apart))
        print(f"Runs that monitor another metric are ranked with --metric {names}")
    out.mkdir(parents=True, exist_ok=True)
    images = [out / "lr_sweep.png", out / "curves.png"]
    plot_lr(runs, metric, images[0])
    plot_curves(rows, metric, images[1], top)
    write_html(out / "report.html", rows, others, metric, images, problems)
    print(f"plots and report written to {out}")
    not_finished = others[len(pruned) :]
    return {
        "metric": metric,
        "runs": runs,
        "rows": rows,
        "by_test": by_test,
        "pruned": pruned,
        "not_finished": not_finished,
        "problems": problems,
        "out": out,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainlab.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="run or sweep directories, or folders holding them"
    )
    parser.add_argument(
        "--metric", help="sort by (default: the monitored metric's best value, e.g. val/acc_best)"
    )
    parser.add_argument("--out", type=Path, help="where to write (default <first dir>/compare)")
    parser.add_argument("--top", type=int, default=5, help="settings to draw learning curves of")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no window
    out = args.out or args.dirs[0] / "compare"
    try:
        with exit_on_user_error():
            result = compare(args.dirs, args.metric, out, args.top)
    except stopping.Stopped as stop:
        stopping.exit_with(stop, f"stopped by {stop.name}; the report in {out} is incomplete.")
    if not result["rows"]:
        print(f"error: no finished run has {result['metric']}.", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
