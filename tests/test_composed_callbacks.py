"""trainlab's own callbacks come from conf/callbacks/ like Lightning's, stay with callbacks=none,
and get what only the run knows through callback.run_info; the command line before Hydra
(trainlab.engine.cli) and the sweep report that reads the sweep's own record."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from trainlab.engine import cli
from trainlab.engine.callbacks.checkpoints import LastCheckpoint
from trainlab.engine.config import CONF_DIR, group_options, known_targets
from trainlab.train import train

OWN = {
    "record",
    "stop_on_signal",
    "stop_on_non_finite_loss",
    "stop_on_stall",
    "ranks_agree",
    "progress",
    "report_to_study",
    "last_checkpoint",
    "apply_optimizer_changes",
}


@pytest.mark.parametrize("option", [o for o in group_options("callbacks") if o != "always"])
def test_every_callbacks_option_keeps_trainlabs_own(compose, option):
    cfg = compose(f"callbacks={option}")
    assert set(cfg.callbacks) >= OWN
    assert ("checkpoint" in cfg.callbacks) == (option == "default")


def test_every_target_in_conf_callbacks_may_be_built():
    named = {
        target
        for path in (CONF_DIR / "callbacks").glob("*.yaml")
        for target in re.findall(r"_target_:\s*([\w.]+)", path.read_text())
    }
    assert len(named) >= len(OWN) and named <= known_targets()


def test_the_yaml_settings_reach_the_callbacks(compose, tmp_path):
    cfg = compose(
        "callbacks=none",
        "logger=csv",
        "test=false",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2",
        "checkpoint_every_n_steps=2",
        "divergence_factor=50",
        "~callbacks.progress",
        "+trainer.enable_progress_bar=false",
    )
    run_dir = tmp_path / "my run"
    record = train(cfg, run_dir, overrides=["callbacks=none"])
    assert record["status"] == "finished"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    stored = ckpt["trainlab"]["config"]  # CheckpointRecord got the run's config as run_info
    assert stored["divergence_factor"] == 50 and stored["seed"] == cfg.seed
    guard = ckpt["callbacks"]["StopOnNonFiniteLoss"]
    assert guard["reference"] is not None
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()  # no ModelCheckpoint


def test_no_checkpoint_callbacks_when_checkpointing_is_off(compose, tmp_path):
    cfg = compose(
        "logger=csv",
        "test=false",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.enable_checkpointing=false",
    )
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["best_ckpt"] is None
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_last_checkpoint_writes_under_the_trainers_root_dir(tmp_path):
    import lightning.pytorch as pl

    callback = LastCheckpoint(every_n_steps=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
    callback.setup(trainer, None, "fit")
    assert callback.path == tmp_path / "checkpoints" / "last.ckpt"


def test_prepare_claims_a_sweep_directory(tmp_path):
    logs = tmp_path / "logs"
    prepared = cli.prepare("train", ["-m", "optimizer.lr=0.1,0.2", f"paths.log_dir={logs}"])
    assert prepared.sweep_dir is not None and prepared.sweep_dir.is_dir()
    assert prepared.sweep_dir.parent == logs / "train" / "sweeps"
    assert prepared.argv[-1] == f"hydra.sweep.dir='{prepared.sweep_dir}'"


def test_prepare_a_dry_run(tmp_path):
    prepared = cli.prepare("train", ["optimizer.lr=0.1,0.2", "--dry-run"])
    try:
        assert prepared.argv[0] == "-m" and "--dry-run" not in prepared.argv
        assert "hydra.launcher.dry_run=true" in prepared.argv
        assert prepared.scratch.is_dir() and prepared.sweep_dir is None
    finally:
        prepared.scratch.rmdir()


def _failed_sweep(sweep_dir: Path) -> None:
    sweep_dir.mkdir()
    job = {"num": 0, "overrides": ["x=1"], "status": "failed", "error": "boom"}
    record = {"jobs": {"0": job}, "resume": "python -m trainlab.train -m x=1 resume=auto"}
    (sweep_dir / "sweep.json").write_text(json.dumps(record))


def test_a_sweep_is_reported_from_its_own_record_only(tmp_path, capsys):
    from hydra_plugins.trainlab_sweeps.process_launcher import run_and_report

    _failed_sweep(tmp_path / "sweep")
    ran = []
    later = time.time() + 60  # the record is older than this run: an earlier run's
    run_and_report(lambda: ran.append(1), tmp_path / "sweep", since=later)
    assert ran == [1] and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exited:
        run_and_report(lambda: None, tmp_path / "sweep", since=0)
    assert exited.value.code == 1
    assert "1 job(s) of the sweep failed: #0 (x=1): boom" in capsys.readouterr().err


def test_a_checkpoint_naming_the_profilers_old_place_still_reads(tmp_path):
    from trainlab.engine import checkpoint

    old = {"trainer": {"profiler": {"_target_": "trainlab.callbacks.NullProfiler"}}}
    torch.save({"trainlab": {"config": old}, "state_dict": {}}, tmp_path / "old.ckpt")
    ckpt = checkpoint.read(tmp_path / "old.ckpt")
    profiler = ckpt["trainlab"]["config"]["trainer"]["profiler"]
    assert profiler["_target_"] == "trainlab.engine.profiler.NullProfiler"


def test_the_live_bar_and_the_log_lines_count_epochs_alike(capsys):
    """Both say "epoch 2/2" for the second of two epochs (Lightning's own bar: "Epoch 1/1")."""
    from conftest import tiny_trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from trainlab.engine.callbacks.progress import EpochLines, LiveBar

    limits = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1}
    tiny_trainer(callbacks=[EpochLines()], enable_progress_bar=True, **limits).fit(BoringModel())
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]

    bar = LiveBar(leave=True)  # each epoch's bar stays on the screen
    tiny_trainer(callbacks=[bar], enable_progress_bar=True, **limits).fit(BoringModel())
    shown = capsys.readouterr().out
    assert "epoch 1/2" in shown and "epoch 2/2" in shown
    assert "Epoch" not in shown and "epoch 0" not in shown


USUAL = {
    "early_stopping": "EarlyStopping",
    "model_summary": "RichModelSummary",
    "swa": "StochasticWeightAveraging",
    "timer": "Timer",
}


def test_each_usual_callback_is_one_override_away(compose):
    from hydra.utils import instantiate

    for name, cls in USUAL.items():
        cfg = compose(f"callbacks=[default,{name}]", "monitor.metric=val/loss", "monitor.mode=min")
        assert set(cfg.callbacks) >= OWN | {"checkpoint", name}  # added to the others
        assert type(instantiate(cfg.callbacks[name])).__name__ == cls
    stopping = instantiate(compose("callbacks=[none,early_stopping]").callbacks.early_stopping)
    assert (stopping.monitor, stopping.mode) == ("val/acc", "max")  # monitor.*, as configured


def test_early_stopping_stops_a_run_whose_metric_stalls(compose, tmp_path):
    cfg = compose(
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=2",
        "optimizer.lr=1e-12",  # the weights all but frozen: val/acc the same every epoch
        "scheduler=none",
        "logger=csv",
        "trainer.max_epochs=10",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=1",
    )
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and "test/acc" in record  # a normal end, tested
    assert record["epochs"] == 3  # the best at epoch 1, then two epochs without a gain


@pytest.mark.slow  # a short run; each builds in the composition test above
def test_the_other_usual_callbacks_run(compose, tmp_path, capsys):
    cfg = compose(
        "callbacks=[default,model_summary,swa,timer]",
        "logger=csv",
        "test=false",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
    )
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["epochs"] == 2
    assert "Trainable params" in capsys.readouterr().out  # the model summary's table
