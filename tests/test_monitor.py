"""One top-level `monitor` (metric and mode): best.ckpt, metrics.json, compare and the W&B sweep
definition all follow it (Optuna's study: tests/test_optuna.py)."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from trainlab.engine.compare import compare
from trainlab.engine.errors import UserError


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory) -> Path:
    """Two runs (runs/0: lr=1e-3, runs/1: lr=0.1) that keep the epoch of lowest val/loss:
    lr=0.1 ends with the lower val/loss, lr=1e-3 with the higher val/acc, so that the two
    metrics rank them apart."""
    cwd = tmp_path_factory.mktemp("monitor")
    for job, lr in enumerate(("1e-3", "0.1")):
        result = run_cli(
            "trainlab.train",
            f"optimizer.lr={lr}",
            "debug=limit",
            "logger=csv",
            "test=false",
            "monitor.metric=val/loss",
            "monitor.mode=min",
            f"hydra.run.dir={cwd / 'runs' / str(job)}",
            cwd=cwd,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs"


def by_epoch(run_dir: Path, column: str) -> dict[int, float]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return {int(r["epoch"]): float(r[column]) for r in csv.DictReader(f) if r[column]}


def test_best_ckpt_and_metrics_json_follow_the_monitor(loss_runs):
    for job in ("0", "1"):
        run_dir = loss_runs / job
        losses = by_epoch(run_dir, "val/loss")
        lowest = min(losses, key=losses.get)
        record = json.loads((run_dir / "metrics.json").read_text())
        assert record["monitor"] == {
            "metric": "val/loss",
            "mode": "min",
            "best": pytest.approx(losses[lowest]),
            "epoch": lowest,
        }
        ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
        assert ckpt["epoch"] == lowest
        (state,) = (s for k, s in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
        assert state["monitor"] == "val/loss" and float(state["best_model_score"]) == (
            pytest.approx(losses[lowest])
        )


def test_compare_ranks_by_the_monitor_lowest_first(loss_runs, tmp_path, capsys):
    found = compare([loss_runs], None, tmp_path / "out")
    assert found["metric"] == "val/loss_best"
    assert "runs by val/loss_best (lower is better)" in capsys.readouterr().out
    ranked = [row["runs"][0].dir.name for row in found["rows"]]
    assert ranked == ["1", "0"]  # lr=0.1 first, though lr=1e-3 has the higher val/acc
    values = [row["val/loss_best"][0] for row in found["rows"]]
    assert values == sorted(values)
    accuracy = {
        row["runs"][0].dir.name: row["runs"][0].metrics["val/acc_best"] for row in found["rows"]
    }
    assert accuracy["0"] > accuracy["1"]
    assert "<th>val/loss_best</th>" in (tmp_path / "out" / "report.html").read_text()


def test_compare_reads_records_from_before_the_monitor(loss_runs, tmp_path):
    # As a run recorded before `monitor` existed: no monitor in metrics.json or the config,
    # best.ckpt's monitor in callbacks.checkpoint; the best value comes from metrics.csv.
    old = shutil.copytree(loss_runs, tmp_path / "old")
    for job in ("0", "1"):
        record = json.loads((old / job / "metrics.json").read_text())
        del record["monitor"]
        (old / job / "metrics.json").write_text(json.dumps(record))
        config_path = old / job / ".hydra" / "config.yaml"
        config = yaml.safe_load(config_path.read_text())
        del config["monitor"]
        config["callbacks"]["checkpoint"].update(monitor="val/loss", mode="min")
        config_path.write_text(yaml.safe_dump(config))
    now = compare([loss_runs], None, tmp_path / "now")
    then = compare([old], None, tmp_path / "then")
    assert then["metric"] == "val/loss_best"
    assert [r["val/loss_best"] for r in then["rows"]] == [r["val/loss_best"] for r in now["rows"]]


def test_monitor_mode_is_checked_in_one_line(tmp_path):
    result = run_cli("trainlab.train", "logger=csv", "monitor.mode=maximum", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: 'monitor.mode' must be min (lower is better) or max, but it is 'maximum' "
        "(in 'monitor.mode=maximum')."
    )
    assert not (tmp_path / "logs").exists()


def test_the_wandb_sweep_optimises_the_monitor():
    from trainlab.engine.wandb_sweep import definition

    search = "hparams_search=optuna_lr_batch"
    assert definition([search])["metric"] == {"name": "val/acc", "goal": "maximize"}
    loss = definition([search, "experiment=char_gpt"])  # monitors val/loss, min
    assert loss["metric"] == {"name": "val/loss", "goal": "minimize"}
    with pytest.raises(UserError, match="monitor.metric is null"):
        definition([search, "experiment=mnist_gan"])  # monitors nothing


def test_a_resumed_run_remembers_its_best_before(tmp_path):
    # mode=max on val/loss: the best is the first epoch's, which a resumed run did not see.
    common = ("debug=limit", "logger=csv", "test=false", "monitor.metric=val/loss")
    first = tmp_path / "first"
    result = run_cli(
        "trainlab.train", *common, "monitor.mode=max", f"hydra.run.dir={first}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = json.loads((first / "metrics.json").read_text())["monitor"]
    assert before["epoch"] == 0

    resumed = tmp_path / "resumed"
    result = run_cli(
        "trainlab.train",
        *common,
        "monitor.mode=max",
        "trainer.max_epochs=3",
        "resume_allow_changes=true",
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={resumed}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(by_epoch(resumed, "val/loss")) == [2]  # it validated epoch 2 alone
    assert json.loads((resumed / "metrics.json").read_text())["monitor"] == before


def test_compare_names_runs_that_monitor_another_metric(loss_runs, tmp_path, capsys):
    # A run that monitors val/acc among two that monitor val/loss: not ranked with them.
    other = shutil.copytree(loss_runs / "0", tmp_path / "acc run")
    record = json.loads((other / "metrics.json").read_text())
    record["monitor"] = {"metric": "val/acc", "mode": "max", "best": record["val/acc_best"]}
    (other / "metrics.json").write_text(json.dumps(record))
    found = compare([loss_runs, other], None, tmp_path / "out")
    assert found["metric"] == "val/loss_best"
    assert sorted(run.dir for row in found["rows"] for run in row["runs"]) == [
        loss_runs / "0",
        loss_runs / "1",
    ]
    assert "ranked with --metric val/acc_best" in capsys.readouterr().out


def test_a_metric_that_validation_does_not_log_is_one_paragraph(tmp_path):
    result = run_cli(
        "trainlab.train", "debug=limit", "logger=csv", "monitor.metric=val/los", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: monitor.metric=val/los was not logged by validation")
    assert "val/loss" in result.stderr and "Traceback" not in result.stderr
    # what trained toward a metric never logged is no use: no run directory is left
    assert not (tmp_path / "logs").exists()
