"""compare on any folder: every run and sweep below it, and every record it cannot read named.

One real 3-job sweep is run; the tests copy it where they need it and damage the copies.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from trainlab.engine.compare import compare


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
