"""Bad input on the command line: one clear paragraph, exit code 2, no traceback, no training."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli

from trainlab.engine.config import group_options

MODELS = ", ".join(group_options("model"))  # as the message lists them

BAD_OVERRIDES = [
    # (override, words the message must contain)
    ("optimizer.lr=abc", ["optimizer.lr", "a positive number", "'abc'"]),
    ("optimizer.lr=-0.1", ["optimizer.lr", "positive number"]),
    ("optimizer.lr=0", ["optimizer.lr", "positive number"]),
    ("data.batch_size=0", ["data.batch_size", "positive integer"]),
    ("data.batch_size=-32", ["data.batch_size", "positive integer"]),
    ("data.batch_size=12.5", ["data.batch_size", "positive integer"]),
    ("data.val_size=-1", ["data.val_size", "an integer >= 0", "`val_size: NonNegativeInt"]),
    ("trainer.max_epochs=many", ["trainer.max_epochs", "a positive integer, or -1"]),
    ("seed=-1", ["seed", "integer >= 0"]),
    ("optimizer=adamm", ["optimizer=adamm", "adam, adamw, sgd", "Did you mean 'optimizer=adam'"]),
    ("model=resnet", ["model=resnet", MODELS, "Did you mean 'model=resnet18'"]),
    ("optimizer.lrr=0.1", ["optimizer.lrr", "Did you mean 'optimizer.lr'", "+optimizer.lrr=0.1"]),
    ("trainer.max_epoch=3", ["Did you mean 'trainer.max_epochs'"]),
    ("optimzer=sgd", ["Did you mean 'optimizer'"]),
    ("data.batchsize=32", ["Did you mean 'data.batch_size'"]),
    ("optimizer.lr=1e-3,oops", ["optimizer.lr", "'oops'"]),  # one bad value in a sweep
    ("optimizer.lr=[1", ["cannot read the command line"]),
    ("model.net._target_=os.system", ["asks to build 'os.system'", "no file in"]),
    # values of a _target_'s parameters, written in a YAML file or not: checked by its signature
    ("data.per_device=yes", ["data.per_device", "true or false", "`per_device: bool = False`"]),
    ("data.per_device=null", ["data.per_device", "true or false"]),
    ("trainer.benchmark=3", ["trainer.benchmark", "true or false or null"]),
    ("optimizer.eps=tiny", ["optimizer.eps", "a positive number", "'tiny'"]),
    (
        "trainer.precision=64bit",
        ["trainer.precision", "one of 64, 32, 16", "lightning.pytorch.Trainer"],
    ),
    ("data.per_devic=true", ["Did you mean 'data.per_device'", "also takes", "per_device"]),
    ("optimizer.amsgard=true", ["Did you mean 'optimizer.amsgrad'", "torch.optim.Adam"]),
]


@pytest.mark.parametrize(("override", "words"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_refused_with_a_message(tmp_path, override, words):
    result = run_cli("trainlab.train", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ")
    for word in words:
        assert word in message
    assert "Traceback" not in result.stderr
    assert len(message.splitlines()) == 1  # one paragraph
    assert not (tmp_path / "logs").exists()  # nothing started


def test_a_net_that_refuses_its_input_says_why_in_one_paragraph(tmp_path):
    # 7x7 patches do not tile the digits' 8x8 images: the net's own UserError, not Hydra's
    # wrapping of it, reaches the user
    result = run_cli("trainlab.train", "experiment=mnist_vit", "data=digits", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "patch" in message
    assert "Traceback" not in result.stderr and "InstantiationException" not in result.stderr


def test_bad_value_in_a_multirun_stops_before_any_job(tmp_path):
    result = run_cli("trainlab.train", "-m", "data.batch_size=32,-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.batch_size" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_added_key_with_plus_is_accepted_by_the_check(tmp_path):
    from trainlab.engine.config import check_command_line

    check_command_line(
        "train", ["+trainer.gradient_clip_val=0.5", "optimizer=sgd", "optimizer.momentum=0.8"]
    )


def test_a_parameter_no_yaml_writes_reaches_the_run(tmp_path):
    # data.per_device is not in conf/data/digits.yaml: the data module's __init__ takes it
    short = ("trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=csv", "test=false")
    result = run_cli("trainlab.train", "data.per_device=true", *short, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (config,) = tmp_path.glob("logs/train/runs/*/.hydra/config.yaml")
    assert "per_device: true" in config.read_text()


def test_the_check_reads_parameters_without_importing_torch():
    # the targets' sources are parsed, not imported: a typo costs no torch import
    probe = (
        "import sys; from trainlab.engine.config import check_command_line as check; "
        "check('train', ['data.per_device=true', 'trainer.benchmark=true', 'model=cnn']); "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"


def test_code_no_config_names_is_never_looked_into():
    # subprocess.Popen takes `args`, but no file in conf/ names it: the key stays unknown
    from trainlab.engine.config import _constructor_parameter
    from trainlab.engine.parameters import parameters

    assert "args" in parameters("subprocess.Popen")
    assert _constructor_parameter({"x": {"_target_": "subprocess.Popen"}}, "x.args") is None
    assert _constructor_parameter({"x": {"_target_": "torch.optim.Adam"}}, "x.amsgrad")


def test_full_traceback_on_request(tmp_path):
    result = run_cli(
        "trainlab.train", "optimizer.lr=abc", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr


def test_help_lists_groups_without_loading_torch(tmp_path):
    result = run_cli("trainlab.train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data:", "model:", "optimizer:", "scheduler:", "trainer:", "logger:", "debug:"):
        assert group in result.stdout
    # what --help costs: importing the entry point must not import torch or lightning
    probe = (
        "import sys, trainlab.train, trainlab.eval; "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"


SCRIPTS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
    "scripts"
]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help(script, tmp_path):
    # The installed script calls module:main; `python -m module` runs the same main.
    module, _, function = SCRIPTS[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    result = run_cli(module, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout or "== Configuration groups ==" in result.stdout
    assert not list(tmp_path.iterdir())  # --help leaves no run directory


def test_eval_without_checkpoint_path(tmp_path):
    result = run_cli("trainlab.eval", cwd=tmp_path)
    assert result.returncode != 0
    assert "ckpt_path" in result.stderr


def test_eval_missing_checkpoint(tmp_path):
    result = run_cli("trainlab.eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.ckpt does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_values_without_m_is_refused_before_anything_starts(tmp_path):
    result = run_cli("trainlab.train", "optimizer.lr=1e-3,1e-2", cwd=tmp_path)
    assert result.returncode == 2
    assert "'optimizer.lr=1e-3,1e-2' gives several values, which makes a sweep: add -m" in (
        result.stderr
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["debug=limit", "optimizer.lr=0.01"],
        ["model=cnn", "data.per_device=true", "hydra.job.chdir=false", "seed=3"],
        ["-m", "optimizer.lr=1e-3,1e-2", "data.batch_size=64", "hydra/launcher=process"],
        ["experiment=digits_cnn", "hydra.run.dir=runs/${hydra.job.override_dirname}"],
    ],
    ids=["keys", "parameter-and-hydra-keys", "sweep", "dir-named-by-overrides"],
)
def test_the_check_hands_the_run_directory_what_composing_gives(tmp_path, monkeypatch, argv):
    """The run directory is chosen from the config the check built (one composition fewer a
    run): it must be the config Hydra's compose gives for the same command line, records and
    all."""
    import hydra
    from omegaconf import OmegaConf

    from trainlab.engine import config, run_dirs

    monkeypatch.chdir(tmp_path)
    config.forget_compositions()
    checked = config.check_command_line("train", argv)
    with monkeypatch.context() as patched:  # handed over, not composed again
        patched.setattr(hydra, "compose", lambda *a, **k: pytest.fail("composed again"))
        handed = run_dirs.compose("train", [a for a in checked if not a.startswith("-")])
    config.forget_compositions()
    composed = run_dirs.compose("train", [a for a in checked if not a.startswith("-")])
    config.forget_compositions()
    assert OmegaConf.to_container(handed) == OmegaConf.to_container(composed)
    assert str(handed.hydra.run.dir) == str(composed.hydra.run.dir)
