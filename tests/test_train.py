"""Training and evaluation end to end: a real Trainer, real Hydra, real W&B offline files."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from trainlab.engine import checkpoint
from trainlab.engine.errors import UserError
from trainlab.eval import evaluate
from trainlab.train import train

METRIC_KEYS = [
    "val/acc",
    "val/acc_best",
    "val/f1",
    "val/precision",
    "val/recall",
    "val/loss",
    "test/acc",
    "test/f1",
    "test/precision",
    "test/recall",
    "train/loss",
]


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "logs" / "train" / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m trainlab.train` with no overrides at all, in an empty directory."""
    cwd = tmp_path_factory.mktemp("default")
    result = run_cli("trainlab.train", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result, only_run_dir(cwd)


def test_default_run_reaches_95_percent_on_digits(default_run):
    _, _, run_dir = default_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["test/acc"] >= 0.95
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 10.0, key
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-6
    assert metrics["overrides"] == []


def test_run_directory_holds_config_checkpoints_and_metrics(default_run):
    _, _, run_dir = default_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "step", "train/loss_step", "val/acc"} <= set(header)


def test_wandb_falls_back_to_offline_without_credentials(default_run):
    _, result, run_dir = default_run
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    wandb_file = next(offline_runs[0].glob("run-*.wandb"))
    assert wandb_file.stat().st_size > 1000  # the binary log of a whole run
    assert f"wandb sync {offline_runs[0]}" in result.stdout


def test_output_prints_config_and_one_line_per_epoch(default_run):
    _, result, run_dir = default_run
    assert "optimizer" in result.stdout and "lr: 0.001" in result.stdout  # the config tree
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 20 and "val/acc" in epoch_lines[-1]
    for text in (result.stdout, result.stderr, (run_dir / "train.log").read_text()):
        assert "Tip:" not in text and "pypi" not in text.lower()


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(default_run):
    _, _, run_dir = default_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["trainlab"]["config"]["optimizer"]["lr"] == 1e-3
    model = checkpoint.build_model(checkpoint.read(run_dir / "checkpoints" / "best.ckpt"))
    x = torch.rand(4, 1, 8, 8)
    assert model.eval()(x).shape == (4, 10)


def test_eval_from_checkpoint_matches_the_training_run(default_run):
    cwd, _, run_dir = default_run
    best = run_dir / "checkpoints" / "best.ckpt"
    result = run_cli("trainlab.eval", f"ckpt_path={best}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    eval_dir = next((cwd / "logs" / "eval" / "runs").iterdir())
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/f1", "test/precision", "test/recall"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6)
    assert evaluated["ckpt_path"] == str(best)


def test_eval_on_val_split(compose, tmp_path):
    run_dir = tmp_path / "run"
    train(compose("debug=limit", "logger=csv"), run_dir)
    record = evaluate(
        compose(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "split=val", config="eval"),
        tmp_path / "eval",
    )
    assert set(record) >= {"val/acc", "val/f1", "val/loss"}


def test_same_seed_same_metrics(compose, tmp_path):
    def metrics(seed, name):
        record = train(
            compose("debug=limit", "logger=csv", f"seed={seed}", "callbacks=none", "test=false"),
            tmp_path / name,
        )
        return {k: v for k, v in record.items() if "/" in k}

    first, second, other = metrics(7, "a"), metrics(7, "b"), metrics(8, "c")
    assert first == second
    assert first != other  # the seed does reach the run


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit", "profiler"])
def test_debug_modes_run(compose, tmp_path, debug):
    record = train(compose(f"debug={debug}", "logger=csv"), tmp_path)
    assert record["status"] == "finished"
    if debug == "fdr":
        assert record["steps"] == 1
    if debug == "overfit":  # three fixed batches: the net should learn them by heart
        assert record["train/acc"] >= 0.95
    if debug == "limit":
        assert record["steps"] == 2 * 5 and record["epochs"] == 2
    if debug == "profiler":
        assert "Profiler Report" in (tmp_path / "fit-profile.txt").read_text()


@pytest.mark.parametrize("logger", ["tensorboard", "many"])
def test_other_loggers_write_their_files(compose, tmp_path, logger):
    train(compose("debug=limit", f"logger={logger}"), tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.csv").is_file()
    if logger == "many":
        assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_schedule_that_needs_a_length_on_an_endless_run(compose, tmp_path):
    with pytest.raises(UserError, match="scheduler=none"):
        train(compose("trainer.max_epochs=-1", "logger=csv", "scheduler=cosine"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed"


def test_wandb_run_gets_flat_config_group_and_name(compose, tmp_path):
    from omegaconf import OmegaConf

    from trainlab.engine.loggers import build_loggers
    from trainlab.engine.run_record import flat_hparams
    from trainlab.train import _finish_wandb

    cfg = compose("optimizer=sgd", "tags=[a,b]")
    try:
        loggers = build_loggers(cfg, tmp_path, group="2026-01-01_00-00-00", name="optimizer=sgd")
        wandb_logger = next(lg for lg in loggers if type(lg).__name__ == "WandbLogger")
        params = flat_hparams(OmegaConf.to_container(cfg, resolve=True), {"optimizer": "sgd"})
        wandb_logger.log_hyperparams(params)
        run = wandb_logger.experiment
        assert run.offline
        assert run.config["optimizer.lr"] == 0.05 and run.config["data.batch_size"] == 64
        assert run.config["optimizer"] == "sgd"
        assert not any(key.endswith("_target_") for key in dict(run.config))
        assert run.group == "2026-01-01_00-00-00" and run.name == "optimizer=sgd"
        assert set(run.tags) == {"a", "b"}
    finally:
        _finish_wandb()


def test_eval_sweeps_over_checkpoints(default_run):
    cwd, _, run_dir = default_run
    ckpts = [run_dir / "checkpoints" / name for name in ("best.ckpt", "last.ckpt")]
    result = run_cli("trainlab.eval", "-m", f"ckpt_path={ckpts[0]},{ckpts[1]}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (cwd / "logs" / "eval" / "sweeps").iterdir()
    evaluated = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    assert [e["ckpt_path"] for e in evaluated] == [str(c) for c in ckpts]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from trainlab.engine.config import CONF_DIR

    root = tmp_path_factory.mktemp("ckpt")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"paths.log_dir={root}", "debug=limit", "logger=csv"])
    train(cfg, root / "run")
    return root / "run" / "checkpoints" / "last.ckpt"


def _eval_cli(ckpt: Path, cwd: Path):
    return run_cli("trainlab.eval", f"ckpt_path={ckpt}", cwd=cwd)


def test_eval_refuses_a_corrupt_checkpoint(small_checkpoint, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(small_checkpoint.read_bytes()[:5000])
    for bad in (garbage, truncated):
        result = _eval_cli(bad, tmp_path)
        assert result.returncode == 2
        assert f"checkpoint {bad} cannot be read" in result.stderr
        assert "Traceback" not in result.stderr


def test_eval_refuses_a_checkpoint_from_elsewhere(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    result = _eval_cli(foreign, tmp_path)
    assert result.returncode == 2
    assert "not written by trainlab.train" in result.stderr


def test_stored_config_cannot_name_arbitrary_code(small_checkpoint, tmp_path):
    ckpt = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    ckpt["trainlab"]["config"]["model"]["net"]["_target_"] = "os.system"
    tampered = tmp_path / "tampered.ckpt"
    torch.save(ckpt, tampered)
    with pytest.raises(UserError, match="os.system"):
        checkpoint.build_model(checkpoint.read(tampered))


def test_checkpoint_with_wrong_weights_for_its_config(small_checkpoint, tmp_path):
    ckpt = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    ckpt["trainlab"]["config"]["model"]["net"]["hidden"] = [32]
    mismatched = tmp_path / "mismatched.ckpt"
    torch.save(ckpt, mismatched)
    with pytest.raises(UserError, match="do not fit"):
        checkpoint.build_model(checkpoint.read(mismatched))


def test_wandb_with_a_key_but_no_server_goes_offline_without_hanging(tmp_path):
    key = "local-fake-key-" + "0123456789abcdef" * 2
    other_secret = "fake-secret-access-key-5f3c1e"
    env = {
        "WANDB_API_KEY": key,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "AWS_SECRET_ACCESS_KEY": other_secret,
    }
    result = run_cli(
        "trainlab.train", "debug=limit", "test=false", cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "127.0.0.1 is not reachable; logging offline" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    # secrets: no file of the run (configs, logs, checkpoints, W&B files) and no output holds one
    for secret in (key, other_secret):
        assert secret not in result.stdout + result.stderr
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
