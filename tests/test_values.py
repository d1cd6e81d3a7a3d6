"""Bad values are refused before anything is built, and a diverging run stops with a message.

Most value checks are in-process calls of check_command_line (what every entry point calls
first); a few run the real command to show that nothing starts and no directory is left.
Values of nets, data sets and LightningModules are checked by what their constructors declare
(trainlab.engine.parameters), also for a net that a fork adds.
"""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_cli, tiny_trainer

from trainlab.engine.callbacks.guards import StopOnNonFiniteLoss
from trainlab.engine.config import check_command_line, check_values
from trainlab.engine.errors import UserError
from trainlab.engine.parameters import check

REPO = Path(__file__).resolve().parents[1]

BAD = [
    ("data.num_workers=-3", "auto or an integer >= 0"),
    ("data.num_workers=abc", "auto or an integer >= 0"),
    ("data.num_workers=1.5", "auto or an integer >= 0"),
    ("data.batch_size=0", "a positive integer"),
    ("data.val_size=1.5", "an integer >= 0, a number > 0 and < 1 or null"),
    ("data.val_size=-10", "an integer >= 0, a number > 0 and < 1 or null"),
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
    ("model.net.dropout=1.0", "a number >= 0 and < 1 (`dropout: Annotated"),
    ("model.net.dropout=-0.1", "a number >= 0 and < 1"),
    ("model.net.hidden=[256,0]", "a list, each an integer > 0"),
    ("model.net.hidden=512", "a list, each an integer > 0"),
    ("model=cnn model.net.channels=[32,-64]", "a list, each an integer > 0"),
    ("experiment=char_gpt data.block_size=0", "an integer > 0"),
    ("experiment=char_gpt model.net.n_layer=0", "an integer > 0"),
    ("model=vit model.net.patch_size=0", "an integer > 0"),
    ("seed=-1", "an integer >= 0, or null"),
    ("threads=0", "a positive integer or auto"),
    ("lr_scaling.base_batch_size=0", "a positive integer"),
    ("checkpoint_every_n_steps=0", "a positive integer or null"),
    ("divergence_factor=0.5", "a number > 1"),
    ("divergence_factor=abc", "a number"),
    ("optimizer.lr=inf", "a finite number"),
    ("optimizer.lr=1e400", "a finite number"),
    ("optimizer.lr=nan", "a finite number"),
    ("+optimizer.betas=[0.9,inf]", "a finite number"),
    ("model.net=5", "a config node"),
    ("trainer.precision=bogus", "one of 64, 32, 16, transformer-engine"),
    ("model=rnn model.net.cell=gpu", "one of lstm, gru"),
    ("experiment=char_gpt data.val_size=0", "an integer > 0 or a number > 0 and < 1"),
    ("-m data.batch_size=32,0", "a positive integer"),
    ("-m model.net.dropout=0.1,1.5", "a number >= 0 and < 1"),
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
    "model.net.hidden=[512] seed=0 model.net.hidden=[] data.val_size=0",
    "experiment=char_gpt model.net.n_layer=2 data.block_size=64 data.test_size=0",
    "-m data.batch_size=32,64 experiment=mnist_gan",
    # Optuna's own defaults
    "-m hparams_search=optuna_lr_batch +hydra.sweeper.pruner_args.n_warmup_steps=0"
    " +hydra.sweeper.pruner_args.n_startup_trials=0",
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
    with pytest.raises(
        UserError, match=r"'data.num_workers' takes auto or .* -3 \(set in the config"
    ):
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
        assert result.stderr.startswith("error: 'data.num_workers' takes auto or an integer")
        assert f"data.num_workers={value}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "logs").exists()


def test_the_trainers_hardware_is_asked_for_before_hydra_runs():
    import torch

    def refused(*argv: str) -> str:
        with pytest.raises(UserError) as e:
            check_command_line("train", list(argv))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "which Lightning does not know" in refused("+trainer.accelerator=abacus")
    if importlib.util.find_spec("torch_xla") is None:
        assert "needs a TPU and torch_xla" in refused("+trainer.accelerator=tpu")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        for argv in (["trainer=gpu"], ["trainer=ddp"], ["+trainer.accelerator=cuda"]):
            assert "torch finds none on this machine: choose trainer=cpu" in refused(*argv)
    else:
        message = refused("trainer=gpu", f"trainer.devices={gpus + 1}")
        assert f"but this machine has {gpus}" in message
        check_command_line("train", ["trainer=gpu", f"trainer.devices={gpus}"])
    check_command_line("train", ["trainer=cpu", "trainer.devices=2"])  # processes, not devices


def test_a_reference_to_no_key_is_one_paragraph(tmp_path):
    with pytest.raises(UserError, match=r"to a key that the config does not have") as e:
        check_command_line("train", [f"paths.log_dir={tmp_path}/a${{x}}"])
    assert f"'paths.log_dir={tmp_path}/a${{x}}'" in str(e.value) and "\n" not in str(e.value)
    check_command_line("train", [f"paths.log_dir={tmp_path}/a\\${{x}}"])  # escaped: as written


# A module of a fork's own, read without importing it: what each annotation lets through.
FORKS_NET = """
from typing import Annotated, Literal, Optional

from pydantic import Field, PositiveInt
from torch import nn

Width = Annotated[int, Field(gt=0)]
Cell = Literal["lstm", "gru"]


class Base(nn.Module):
    def __init__(self, dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1):
        super().__init__()


class Net(Base):
    def __init__(
        self,
        layers: list[int],
        dim: int = -1,
        widths: list[Width] = (8,),
        cell: Cell = "lstm",
        scale: "Optional[float]" = None,
        block: nn.Module = None,
        count=3,
        anything=object(),
        **kwargs,
    ):
        super().__init__(**kwargs)
"""

DECLARED = [  # (parameter, value, what it takes: None where the value passes)
    ("layers", [128, 64], None),
    ("layers", [], None),
    ("layers", "abc", "a list, each an integer"),
    ("layers", [1.5], "a list, each an integer"),
    ("layers", ["1"], "a list, each an integer"),  # Hydra typed it: quoted, it is text
    ("dim", -3, None),
    ("dim", 2.0, "an integer"),
    ("dim", True, "an integer"),
    ("widths", [4, 0], "a list, each an integer > 0"),
    ("cell", "gru", None),
    ("cell", "rnn", "one of lstm, gru"),
    ("scale", None, None),
    ("scale", 3, None),  # an integer is a number
    ("scale", math.inf, "a number or null"),
    ("scale", math.nan, "a number or null"),
    ("block", {"_target_": "torch.nn.ReLU"}, None),
    ("block", 5, "a config node or null"),
    ("count", 4, None),
    ("count", "4", "an integer"),  # no annotation: its default's type
    ("anything", "x", None),  # neither: nothing to check
    ("dropout", 0.0, None),  # a base class's, passed on through **kwargs
    ("dropout", 1.0, "a number >= 0 and < 1"),
]


@pytest.fixture(scope="module")
def forks_net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fork")
    (folder / "forks_nets.py").write_text(FORKS_NET)
    sys.path.insert(0, str(folder))
    yield "forks_nets.Net"
    sys.path.remove(str(folder))


@pytest.mark.parametrize("name,value,takes", DECLARED, ids=[f"{n}={v!r}" for n, v, _ in DECLARED])
def test_values_are_checked_by_what_the_parameter_declares(forks_net, name, value, takes):
    assert check(forks_net, name, value) == takes


def fork_with_a_net(tmp_path: Path) -> Path:
    """A fork of the template (its src/ and conf/ copied) that adds a net whose `layers` is a
    list of widths and whose `dim` is the first dimension to flatten, as torch names dimensions
    (negative from the end), and a model config for it: no file of the template edited."""
    fork = tmp_path / "fork"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "src", fork / "src", ignore=skip)
    shutil.copytree(REPO / "conf", fork / "conf", ignore=skip)
    (fork / "src/trainlab/nets/widths.py").write_text(
        textwrap.dedent(
            """
            import math

            from torch import nn


            class Widths(nn.Sequential):
                def __init__(
                    self, input_shape: list[int], num_classes: int, layers: list[int], dim: int
                ):
                    first = dim + len(input_shape) if dim < 0 else dim - 1  # of input_shape
                    width, blocks = math.prod(input_shape[first:]), []
                    for w in layers:
                        blocks += [nn.Linear(width, w), nn.ReLU()]
                        width = w
                    super().__init__(nn.Flatten(dim), *blocks, nn.Linear(width, num_classes))
            """
        )
    )
    (fork / "conf/model/widths.yaml").write_text(
        "defaults:\n  - base/classifier@_here_\n  - _self_\n\n"
        "net:\n  _target_: trainlab.nets.widths.Widths\n  layers: [32]\n  dim: 1\n"
    )
    return fork


def test_a_forks_net_trains_with_lists_of_widths_and_negative_dims(tmp_path):
    fork = fork_with_a_net(tmp_path)
    logs = tmp_path / "logs"
    run = [
        "model=widths",
        "logger=csv",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        f"paths.log_dir={logs}",
    ]
    env = {"PYTHONPATH": str(fork / "src")}
    # cold: a fresh interpreter reads the fork from its PYTHONPATH
    bad = run_cli("trainlab.train", *run, "model.net.layers=abc", cwd=tmp_path, env=env, cold=True)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: 'model.net.layers' takes a list, each an integer (`layers: list[int]` in "
        "trainlab.nets.widths.Widths), but it is 'abc' (in 'model.net.layers=abc')."
    ]
    assert not logs.exists()

    args = [*run, "model.net.layers=[128,64]", "model.net.dim=-3"]
    result = run_cli("trainlab.train", *args, cwd=tmp_path, env=env, cold=True)
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(p.read_text()) for p in logs.rglob("metrics.json")]
    assert record["status"] == "finished" and record["steps"] == 4
    weights = torch.load(record["best_ckpt"], weights_only=True)["state_dict"]
    shapes = [tuple(w.shape) for k, w in weights.items() if k.endswith("weight")]
    assert shapes == [(128, 64), (64, 128), (10, 64)]  # 8x8 digits, flattened from dim -3


def write_bad_images(root: Path) -> None:
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "x.jpg").write_bytes(b"not a jpeg")


slow = pytest.mark.slow
BAD_RUNS = [  # refused before Hydra runs the job, or while the run has trained nothing
    pytest.param(["optimizer.lr=1e400"], id="lr=1e400"),
    pytest.param(["data.val_size=100000"], id="val_size-beyond-the-data"),
    pytest.param(["optimizer.lr=inf"], id="lr=inf", marks=slow),
    pytest.param(["optimizer.lr=nan"], id="lr=nan", marks=slow),
    pytest.param(["data.batch_size=1e11"], id="batch_size=1e11", marks=slow),
    pytest.param(["data.batch_size=100000000000"], id="batch_size-beyond-the-data", marks=slow),
    pytest.param(["data=mnist", "data.download=false"], id="no-mnist", marks=slow),
    pytest.param(["data=image_folder", "data.root=empty"], id="empty-folder", marks=slow),
    pytest.param(["data=image_folder", "data.root=bad"], id="corrupt-folder", marks=slow),
    pytest.param(["trainer=gpu"], id="gpu", marks=slow),
    pytest.param(["trainer.precision=bogus"], id="precision", marks=slow),
    pytest.param(["+trainer.accelerator=tpu"], id="tpu", marks=slow),
    pytest.param(["model.net=5"], id="net=5", marks=slow),
    pytest.param(["paths.log_dir=LOGS/a${x}"], id="log-dir-${x}", marks=slow),
    pytest.param(["monitor.metric=val/acc2"], id="unknown-monitor", marks=slow),
]


@pytest.mark.parametrize("args", BAD_RUNS)
def test_a_bad_value_is_one_paragraph_and_leaves_no_directory(tmp_path, args):
    import torch

    if "trainer=gpu" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "+trainer.accelerator=tpu" in args and importlib.util.find_spec("torch_xla"):
        pytest.skip("this Python has torch_xla")
    (tmp_path / "data" / "empty" / "train").mkdir(parents=True)
    write_bad_images(tmp_path / "data" / "bad")
    logs = tmp_path / "logs"
    result = run_cli(
        "trainlab.train",
        "logger=csv",
        "trainer.max_epochs=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={logs}",
        *[a.replace("LOGS", str(logs)) for a in args],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert not logs.exists() or not any(logs.iterdir())


def test_a_full_disk_is_one_paragraph(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        result = run_cli("trainlab.train", f"paths.log_dir={disk / 'logs'}", cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"error: the disk that holds {disk} has ")
        assert "bytes free" in result.stderr and len(result.stderr.splitlines()) == 1
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_net_without_hidden_layers_trains(tmp_path):
    """model.net.hidden=[]: a linear classifier, once refused as 'not a positive integer'."""
    result = run_cli(
        "trainlab.train",
        "model.net.hidden=[]",
        "logger=csv",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    shapes = [tuple(w.shape) for k, w in weights["state_dict"].items() if k.endswith("weight")]
    assert shapes == [(10, 64)]


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
