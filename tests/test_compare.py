"""compare on any folder: every run and sweep below it, and every record it cannot read named.

One real 3-job sweep is run; the tests copy it where they need it and damage the copies.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from trainlab.engine.compare import compare
from trainlab.train import train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("compare")
    result = run_cli(
        "trainlab.train",
        "-m",
        "optimizer.lr=1e-3,1e-2,3e-2",
        "debug=limit",
        "logger=csv",
        "test=false",
        "hydra.launcher.n_jobs=2",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = (cwd / "logs" / "train" / "sweeps").iterdir()
    return found


def copy(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


def truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_a_truncated_metrics_json_is_named_and_the_others_still_ranked(sweep, tmp_path):
    damaged = copy(sweep, tmp_path / "sweep")
    truncate(damaged / "1" / "metrics.json")

    result = run_cli("trainlab.compare", str(damaged), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"unreadable: {damaged / '1' / 'metrics.json'}: is not valid JSON" in result.stdout
    report = (tmp_path / "out" / "report.html").read_text()
    assert "is not valid JSON" in report

    found = compare([damaged], "val/acc_best", tmp_path / "out2")
    ranked = [run.dir.name for row in found["rows"] for run in row["runs"]]
    # the others are ranked as they were; the damaged one too, from what sweep.json kept of it
    assert sorted(ranked) == ["0", "1", "2"]
    one = next(r for r in found["runs"] if r.dir.name == "1")
    recorded = json.loads((sweep / "sweep.json").read_text())["jobs"]["1"]
    assert one.metrics["val/acc_best"] == recorded["val/acc_best"]

    # Without sweep.json to fall back on, the run is listed as unreadable, not dropped.
    (damaged / "sweep.json").unlink()
    found = compare([damaged], "val/acc_best", tmp_path / "out3")
    assert sorted(r.dir.name for row in found["rows"] for r in row["runs"]) == ["0", "2"]
    assert [(r.dir.name, r.status) for r in found["not_finished"]] == [("1", "unreadable")]
    assert [p.path for p in found["problems"]] == [damaged / "1" / "metrics.json"]


def test_compare_logs_finds_nested_sweeps_and_runs(sweep, tmp_path):
    logs = tmp_path / "logs"
    copy(sweep, logs / "train" / "sweeps" / sweep.name)
    copy(sweep, logs / "older" / "project a" / "sweeps" / "first")
    single = copy(sweep / "0", logs / "train" / "runs" / "a-single-run")
    # continued after a stop, and logged elsewhere: still a repeat of the sweep's first job
    record = json.loads((single / "metrics.json").read_text())
    record["overrides"] += ["resume=auto", "logger=wandb"]
    (single / "metrics.json").write_text(json.dumps(record))
    truncate(logs / "older" / "project a" / "sweeps" / "first" / "sweep.json")

    result = run_cli("trainlab.compare", "logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no runs found" not in result.stderr
    # ranked by the default monitor (val/acc, max): each run's best val/acc
    assert "runs by val/acc_best (higher is better)" in result.stdout
    damaged = Path("logs/older/project a/sweeps/first/sweep.json")
    assert f"unreadable: {damaged}: is not valid JSON" in result.stdout
    assert (logs / "compare" / "report.html").is_file()

    found = compare([logs], "val/acc_best", tmp_path / "out")
    assert len(found["runs"]) == 7  # 3 + 3 jobs, and the single run
    assert not found["not_finished"]
    # each setting's runs are grouped: 3 for the lr the single run has, 2 for the others
    assert sorted(len(row["runs"]) for row in found["rows"]) == [2, 2, 3]


def test_a_folder_without_runs_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    result = run_cli("trainlab.compare", "empty", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no runs found under empty: a run's directory holds")
    assert "Traceback" not in result.stderr


def test_the_report_shows_what_run_directories_say_as_text(tmp_path):
    """A run directory is read, not trusted: a status written as HTML stays text in the report."""
    run = tmp_path / "logs" / "train" / "runs" / "a"
    run.mkdir(parents=True)
    status = "<script>alert(1)</script>"
    (run / "metrics.json").write_text(json.dumps({"status": status, "overrides": ["seed=1"]}))
    compare([tmp_path / "logs"], "val/acc", tmp_path / "out")
    report = (tmp_path / "out" / "report.html").read_text()
    assert "<script>alert(1)" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report


def test_a_figure_is_the_mean_of_the_runs_that_have_it_and_says_how_many(sweep, tmp_path, capsys):
    runs = tmp_path / "runs"
    copy(sweep / "0", runs / "a")
    repeat = copy(sweep / "0", runs / "b")  # the same setting with another seed ...
    record = json.loads((repeat / "metrics.json").read_text())
    record["overrides"].append("seed=7")
    loss = record.pop("val/loss")  # ... whose record lacks a value
    (repeat / "metrics.json").write_text(json.dumps(record))

    found = compare([runs], None, tmp_path / "out")
    (row,) = found["rows"]
    assert len(row["runs"]) == 2
    assert row["val/loss"] == (loss, 0.0, 1)  # one run's value, not averaged with a missing one
    assert row["val/acc_best"] == (record["val/acc_best"], 0.0, 2)
    out = capsys.readouterr().out
    assert f"{loss:.4f} (1 of 2 runs)" in out and "+- 0.0000 (1 of 2" not in out
    assert f"{record['val/acc_best']:.4f} +- 0.0000" in out  # both runs have it


def test_runs_without_validation_are_ranked_by_their_test_metric(sweep, compose, tmp_path, capsys):
    no_val = tmp_path / "no_val"
    train(compose("data.val_size=0", "trainer.max_epochs=1", "logger=csv"), no_val)
    capsys.readouterr()

    alone = compare([no_val], None, tmp_path / "out")
    assert alone["metric"] == "test/acc"
    assert [run.dir for row in alone["rows"] for run in row["runs"]] == [no_val]
    out = capsys.readouterr().out
    assert "No run has val/acc_best (no validation split" in out and "by test/acc" in out

    both = tmp_path / "both"
    copy(sweep, both / "sweep")
    copy(no_val, both / "no_val")
    found = compare([both], None, tmp_path / "out2")
    assert found["metric"] == "val/acc_best" and len(found["rows"]) == 3  # the sweep's jobs
    assert [run.dir.name for row in found["by_test"] for run in row["runs"]] == ["no_val"]
    out = capsys.readouterr().out
    assert "have no val/acc_best: 1 ranked apart by test/acc" in out
    assert "runs by test/acc (higher is better)" in out
    assert "monitor another metric" not in out


def test_the_page_links_each_run_and_has_a_column_per_swept_key(sweep, tmp_path):
    import re
    from urllib.parse import unquote

    found = compare([sweep], None, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    heads = re.findall(r"<th>([^<]*)</th>", page)
    assert heads[:3] == ["#", "optimizer.lr", "runs"] and "val/acc_best" in heads
    lrs = re.findall(r"<tr title=[^>]*><td>\d+</td><td>([^<]*)</td>", page)
    assert sorted(lrs) == ["0.001", "0.01", "0.03"]  # each row's swept value in its column
    links = re.findall(r'<a href="([^"]+)"', page)
    linked = {(tmp_path / "out" / unquote(href)).resolve() for href in links}
    assert linked == {run.dir.resolve() for run in found["runs"]}  # relative: opens offline
    assert page.count('<polyline class="run"') == 3  # the parallel coordinates, a line a run
    assert page.count("<svg width=") == 3  # each run's curve of val/acc in its row
    assert "onclick" not in page and "addEventListener('click'" in page  # sortable
    assert not re.search(r"(src|href)=\"https?:", page)  # nothing fetched: one offline file
