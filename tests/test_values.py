"""Bad numbers are refused before anything is built, and a diverging run stops with a message.

Most value checks are in-process calls of check_command_line (what every entry point calls
first); a few run the real command to show that nothing starts.
"""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_cli, tiny_trainer

from trainlab.engine.callbacks.guards import StopOnNonFiniteLoss
from trainlab.engine.config import check_command_line, check_values
from trainlab.engine.errors import UserError

BAD = [
    ("data.num_workers=-3", "auto or an integer >= 0"),
    ("data.num_workers=abc", "auto or an integer >= 0"),
    ("data.num_workers=1.5", "auto or an integer >= 0"),
    ("data.batch_size=0", "a positive integer"),
    ("data.val_size=1.5", "a fraction between 0 and 1"),
    ("data.val_size=-10", "a fraction between 0 and 1"),
    ("trainer.max_epochs=0", "a positive integer, or -1"),
    ("+trainer.max_steps=-5", "a positive integer, or -1"),
    ("+trainer.min_epochs=-1", "an integer >= 0"),
    ("+trainer.devices=0", "a positive integer, -1 (all), auto"),
    ("+trainer.devices=[-1]", "a list of device indices"),
    ("+trainer.num_nodes=0", "a positive integer"),
    ("trainer.log_every_n_steps=0", "a positive integer"),
    ("+trainer.check_val_every_n_epoch=0", "a positive integer, or null"),
    ("+trainer.val_check_interval=1.5", "a fraction of an epoch"),
    ("+trainer.val_check_interval=0", "a fraction of an epoch"),
    ("+trainer.limit_train_batches=1.5", "a fraction of the batches"),
    ("+trainer.limit_val_batches=-1", "a fraction of the batches"),
    ("+trainer.accumulate_grad_batches=0", "a positive integer"),
    ("+trainer.gradient_clip_val=-1", "a number >= 0"),
    ("optimizer.lr=0", "a positive number"),
    ("optimizer.lr=-1e-3", "a positive number"),
    ("optimizer.weight_decay=-0.1", "a number >= 0"),
    ("optimizer=sgd optimizer.momentum=1.5", "a number in [0, 1)"),
    ("+optimizer.betas=[0.9]", "two numbers in [0, 1)"),
    ("+optimizer.betas=[0.9,1.2]", "two numbers in [0, 1)"),
    ("model.net.dropout=1.0", "a probability in [0, 1)"),
    ("model.net.dropout=-0.1", "a probability in [0, 1)"),
    ("model.net.hidden=[256,0]", "a positive integer, or a list of them"),
    ("model.net.hidden=[]", "a positive integer, or a list of them"),
    ("model=cnn model.net.channels=[32,-64]", "a positive integer, or a list of them"),
    ("experiment=char_gpt data.block_size=0", "a positive integer"),
    ("experiment=char_gpt model.net.n_layer=0", "a positive integer"),
    ("model=vit model.net.patch_size=0", "a positive integer"),
    ("seed=-1", "an integer >= 0, or null"),
    ("threads=0", "a positive integer or auto"),
    ("lr_scaling.base_batch_size=0", "a positive integer"),
    ("checkpoint_every_n_steps=0", "a positive integer or null"),
    ("divergence_factor=0.5", "a number > 1"),
    ("divergence_factor=abc", "a number"),
    ("-m data.batch_size=32,0", "a positive integer"),
]


@pytest.mark.parametrize("line,expected", BAD, ids=[line for line, _ in BAD])
def test_bad_value_is_refused_with_key_value_and_source(line, expected):
    *groups, override = line.split()
    with pytest.raises(UserError) as refused:
        check_command_line("train", [*groups, override])
    message = str(refused.value)
    key, _, value = override.lstrip("+").partition("=")
    assert expected in message
    assert f"'{key}'" in message  # the key
    assert override.split(",")[-1] in message or value in message  # the value, as written
    assert "\n" not in message


# Several values a line, to keep the number of (composing) checks down.
GOOD = [
    "data.num_workers=0 data.val_size=0.2 trainer.max_epochs=-1 +trainer.max_steps=-1",
    "data.num_workers=auto data.val_size=100 +trainer.devices=auto seed=null",
    "data.num_workers=4 +trainer.devices=[0,1] +trainer.val_check_interval=0.5",
    "+trainer.devices='0,1' +trainer.val_check_interval=100 +trainer.limit_val_batches=0",
    "+trainer.limit_train_batches=0.1 +trainer.gradient_clip_val=1.0 divergence_factor=null",
    "+trainer.check_val_every_n_epoch=null +optimizer.betas=[0.9,0.999] divergence_factor=1e6",
    "optimizer=sgd optimizer.momentum=0.0 model.net.dropout=0.0 model.net.hidden=[64]",
    "model.net.hidden=512 seed=0",
    "experiment=char_gpt model.net.n_layer=2 data.block_size=64",
    "-m data.batch_size=32,64 experiment=mnist_gan",
]


@pytest.mark.parametrize("line", GOOD)
def test_good_value_passes(line):
    check_command_line("train", line.split())


def test_every_ready_experiment_passes_the_rules(compose):
    from trainlab.engine.config import CONF_DIR

    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        check_values(compose(f"experiment={path.stem}"))


@pytest.mark.slow
def test_every_option_of_every_group_passes_the_rules(compose):
    from trainlab.engine.config import CONF_DIR

    for group in ("model", "data", "trainer", "optimizer", "scheduler", "debug"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            if group == "model" and path.stem in ("gan", "gpt", "rnn"):
                continue  # they need their own data sets: covered by their experiments
            check_values(compose(f"{group}={path.stem}"))


def test_a_config_file_value_is_checked_too(compose):
    cfg = compose("data.num_workers=-3")  # as an experiment file or an edited YAML would set it
    with pytest.raises(UserError, match=r"'data.num_workers' must be .* -3 \(set in the config"):
        check_values(cfg)


def test_bad_value_stops_the_real_command_before_anything_starts(tmp_path):
    for value in ("-3", "abc"):
        result = run_cli(
            "trainlab.train",
            "data.loader=dataloader",
            f"data.num_workers={value}",
            "logger=csv",
            f"paths.log_dir={tmp_path / 'logs'}",
            cwd=tmp_path,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("error: 'data.num_workers' must be auto or an integer")
        assert f"data.num_workers={value}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "logs").exists()


# --- the divergence guard, with a real Trainer on a model whose loss is set per step -----------


class LossSchedule(pl.LightningModule):
    """A model whose training loss at step i is losses[i] (times a weight that stays 1)."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        return self.weight * 0 + self.losses[min(self.global_step, len(self.losses) - 1)]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(len(self.losses), 1), batch_size=1)


def fit(losses, factor, tmp_path):
    """The step the guard stopped at, or None if the run ended."""
    guard = StopOnNonFiniteLoss(factor)
    trainer = tiny_trainer(callbacks=[guard], default_root_dir=tmp_path)
    try:
        trainer.fit(LossSchedule(losses))
    except UserError as e:
        return trainer.global_step, str(e)
    return None, None


def test_growth_by_orders_of_magnitude_stops_the_run(tmp_path):
    losses = [2.3, 2.0, 50.0, 3e3, 2.4e4, 3.5e28]
    step, message = fit(losses, 1e4, tmp_path)
    assert step == 5  # 2.4e4 > 1e4 x 2.3
    assert message.startswith("the training loss is 2.4e+04 in epoch 1, step 5")
    assert "more than divergence_factor=10000 times its start (2.3)" in message
    assert "Lower optimizer.lr" in message


def test_a_loss_that_starts_near_zero_is_compared_with_at_least_one(tmp_path):
    assert fit([1e-6, 1e-3, 0.5, 9e3], 1e4, tmp_path) == (None, None)
    assert fit([1e-6, 1e-3, 2e4], 1e4, tmp_path)[0] == 3


def test_negative_losses_are_compared_by_size(tmp_path):
    assert fit([-2.0, -1.0, -100.0], 1e4, tmp_path) == (None, None)
    assert fit([-2.0, -1.0, -3e4], 1e4, tmp_path)[0] == 3


def test_null_switches_growth_off_but_nan_and_inf_still_stop(tmp_path):
    assert fit([2.3, 3.5e28, 1e30], None, tmp_path) == (None, None)
    for bad in (math.nan, math.inf):
        step, message = fit([2.3, 5.0, bad], None, tmp_path)
        assert step == 3 and message.startswith(f"the training loss is {bad} in epoch 1, step 3")
        assert "times its start" not in message
    assert fit([math.nan], 1e4, tmp_path)[0] == 1  # also on the very first step


def test_the_start_is_kept_in_checkpoints():
    guard = StopOnNonFiniteLoss(100.0)
    guard._set_reference(2.5)
    resumed = StopOnNonFiniteLoss(100.0)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.reference == 2.5 and resumed.limit == 250.0


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_message(tmp_path):
    """The issue's case: Adam at lr 1e9 reached a loss of 3.5e28 and ended 'finished'."""
    result = run_cli(
        "trainlab.train",
        "optimizer.lr=1e9",
        "logger=csv",
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the training loss is ")
    assert "more than divergence_factor=10000 times its start" in error
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and "diverges" in record["error"]
    # stopped at once, not at the end of the run: within the first block of steps_per_call steps
    block = record["steps_per_call"]["steps_per_call"]
    assert record["steps"] < 10 or record["steps"] <= block
