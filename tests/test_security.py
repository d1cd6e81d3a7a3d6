"""Nothing is built that no config file names: injections through the command line (every entry
point), sweeps and checkpoints are refused in one paragraph, before anything runs.

Each injection asks builtins.open to create pwned.txt in the working directory; a test passes
only if the process fails with a message naming what it refused and the file does not exist.
"""

import pytest
import torch
from conftest import run_cli
from PIL import Image

from trainlab.engine.config import (
    check_command_line,
    check_sweep_params,
    check_targets,
    check_values,
)
from trainlab.engine.errors import UserError

OPEN = "{_target_:builtins.open,file:pwned.txt,mode:w}"
OPEN_YAML = "{_target_: builtins.open, file: pwned.txt, mode: w}"
TRAIN = ("logger=csv", "trainer.max_epochs=1", "test=false")

# (arguments, a word the message must contain); the three and one in a list first
INJECTIONS = [
    (("+model.net.foo=" + OPEN,), "builtins.open"),
    (("model.net.dropout=" + OPEN,), "model.net.dropout"),
    (("+hydra.callbacks.x=" + OPEN,), "+hydra.callbacks.x"),
    (("+x=[" + OPEN + "]",), "x[0]._target_"),
    (("+callbacks.x=" + OPEN,), "builtins.open"),
    (("+model.net._args_=[" + OPEN + "]",), "_args_"),
    (("+model.net.foo={_target_:builtins.open,_partial_:true,file:pwned.txt}",), "builtins.open"),
    (("optimizer._target_=builtins.open", "+optimizer.file=pwned.txt"), "optimizer._target_"),
    (("hydra/callbacks=x",), "hydra/callbacks"),
    (("+hydra.job_logging.handlers.x={class:builtins.open,filename:pwned.txt}",), "job_logging"),
    (("hydra.job.env_set.PYTHONWARNINGS=ignore::antigravity.x",), "env_set"),
    (("hydra.launcher.module=timeit",), "hydra.launcher.module"),
    (("hydra.searchpath=[file:///tmp]",), "hydra.searchpath"),
    ((f"+x='${{oc.create:\"{OPEN_YAML}\"}}'",), "oc.create"),
    ((f"+x=\"${{oc.decode:'{OPEN_YAML}'}}\"",), "oc.decode"),
    (("-m", "+x=1," + OPEN), "builtins.open"),
    (("-m", f"+x=1,'${{oc.create:\"{OPEN_YAML}\"}}'"), "oc.create"),
    (
        ("-m", "hparams_search=seeds", "hydra.sweeper.params.model.net.foo=choice(" + OPEN + ")"),
        "builtins.open",
    ),
    (("--experimental-rerun", "config.pickle"), "--experimental-rerun"),
]


def assert_refused(result, word: str, cwd) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert word in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert not (cwd / "pwned.txt").exists()


# A process each (about a second): the first four in the default suite, the others slow.
CASES = [
    pytest.param(args, word, id=" ".join(args)[:60], marks=[pytest.mark.slow] if i >= 4 else [])
    for i, (args, word) in enumerate(INJECTIONS)
]


@pytest.mark.parametrize("args,word", CASES)
def test_train_refuses_injection(tmp_path, args, word):
    result = run_cli(
        "trainlab.train", *args, *TRAIN, f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path
    )
    assert_refused(result, word, tmp_path)
    assert not (tmp_path / "logs").exists()  # refused before Hydra made a run directory


@pytest.mark.slow
def test_another_config_dir_is_refused(tmp_path):
    evil = tmp_path / "evil" / "experiment"
    evil.mkdir(parents=True)
    (evil / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n"
        "      file: pwned.txt\n      mode: w\n"
    )
    for flag in ("-cd", "--config-dir", "-cp"):
        result = run_cli(
            "trainlab.train", flag, str(tmp_path / "evil"), "+experiment=evil", *TRAIN, cwd=tmp_path
        )
        assert_refused(result, "refused", tmp_path)


@pytest.mark.parametrize(
    "module,args",
    [
        ("trainlab.eval", ("ckpt_path=x.ckpt", "+data.foo=" + OPEN)),
        ("trainlab.eval", ("ckpt_path=x.ckpt", "+hydra.callbacks.x=" + OPEN)),
        ("trainlab.export", ("ckpt_path=x.ckpt", "+x=[" + OPEN + "]")),
        ("trainlab.predict", ("model_path=x.ckpt", "inputs=[a.png]", "+x=" + OPEN)),
    ],
)
def test_every_entry_point_refuses_injection(tmp_path, module, args):
    assert_refused(
        run_cli(module, *args, cwd=tmp_path),
        "refused" if "hydra" in args[-1] else "builtins.open",
        tmp_path,
    )


def test_the_run_refuses_injection_that_skipped_the_command_line_check(tmp_path):
    """Defence in depth: train() checks its resolved config before it builds anything, even
    when Hydra is run without the command-line check (as a custom launcher might)."""
    code = "from trainlab.train import _hydra_main; _hydra_main()"
    import subprocess
    import sys

    from conftest import child_env

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *TRAIN,
            f"paths.log_dir={tmp_path / 'logs'}",
            f"+x='${{oc.create:\"{{y: {OPEN_YAML}}}\"}}'",
            "+callbacks.z=${x.y}",
        ],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused(result, "builtins.open", tmp_path)


def tampered_checkpoint(tmp_path):
    ckpt = tmp_path / "tampered.ckpt"
    config = {
        "model": {
            "_target_": "trainlab.models.classifier.Classifier",
            "net": {"_target_": "builtins.open", "file": "pwned.txt", "mode": "w"},
        }
    }
    torch.save({"trainlab": {"config": config}, "state_dict": {}}, ckpt)
    return ckpt


def test_every_checkpoint_read_checks_its_stored_config(tmp_path):
    from trainlab.engine import checkpoint

    with pytest.raises(UserError, match=r"asks to build 'builtins.open' \(at model.net._target_"):
        checkpoint.read(tampered_checkpoint(tmp_path))


@pytest.mark.slow
def test_eval_export_and_predict_refuse_a_tampered_checkpoint(tmp_path):
    ckpt = tampered_checkpoint(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    for module, arg in (
        ("trainlab.eval", "ckpt_path"),
        ("trainlab.export", "ckpt_path"),
        ("trainlab.predict", "model_path"),
    ):
        args = [f"{arg}={ckpt}"] + (["inputs=[a.png]"] if module == "trainlab.predict" else [])
        assert_refused(run_cli(module, *args, cwd=tmp_path), "model.net._target_", tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"data": {"train_transforms": [{"_target_": "os.system", "command": "touch pwned.txt"}]}},
        {
            "trainer": {
                "strategy": {
                    "_target_": "lightning.pytorch.strategies.DDPStrategy",
                    "timeout": {"_target_": "subprocess.run"},
                }
            }
        },
        {"model": {"net": {"x": '${oc.create:"{_target_: builtins.eval}"}'}}},
        {"model": {"net": {"x": "${oc.decode:'{_target_: builtins.eval}'}"}}},
        {
            "callbacks": {
                "a": {
                    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "_args_": [{"_target_": "builtins.exec"}],
                }
            }
        },
    ],
    ids=["list", "nested", "oc.create", "oc.decode", "_args_"],
)
def test_stored_configs_are_checked_at_every_depth(config):
    with pytest.raises(UserError, match="which no file in .* names"):
        check_targets(config, "checkpoint x.ckpt")


def test_stored_config_with_known_targets_passes(compose):
    from omegaconf import OmegaConf

    cfg = compose("experiment=cifar10_resnet18", "trainer=ddp_cpu")
    check_targets(OmegaConf.to_container(cfg, resolve=True), "checkpoint x.ckpt")
    check_values(cfg)


@pytest.mark.parametrize(
    "params,word",
    [
        ({"model.net.foo": "choice(" + OPEN + ",1)"}, "builtins.open"),
        ({"+x": "[" + OPEN + "]"}, "builtins.open"),
        ({"hydra.callbacks.x": "choice(1,2)"}, "hydra.callbacks.x"),
        ({"model.net.dropout": "choice('${oc.create:\"{a: 1}\"}')"}, "oc.create"),
        ({"data.batch_size": "choice(0, 32)"}, "data.batch_size"),
        ({"optimizer.lr": "tag(log, interval(-1, 1))"}, "optimizer.lr"),
    ],
)
def test_sweep_definitions_are_checked(params, word):
    from hydra_plugins.trainlab_sweeps.optuna_sweeper import search_space

    with pytest.raises(UserError, match=None) as refused:
        check_sweep_params(params, "conf/hparams_search/x.yaml")
    assert word in str(refused.value)
    with pytest.raises(UserError):  # the Optuna sweeper checks its search space itself
        search_space(params)


def test_ready_sweeps_pass():
    from hydra_plugins.trainlab_sweeps.optuna_sweeper import search_space

    for name in ("lr_batch_grid", "optuna_lr_batch", "seeds"):
        check_command_line("train", ["-m", f"hparams_search={name}"])
    assert set(search_space({"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"})) == {"optimizer.lr"}


def test_wandb_sweep_definitions_are_checked(tmp_path):
    from trainlab.engine.wandb_sweep import check_definition, definition

    sweep = definition(["hparams_search=optuna_lr_batch", "trainer.max_epochs=3"])
    check_definition(sweep, "sweep.yaml")  # what trainlab writes passes
    bad_value = {**sweep, "parameters": {"model.net.foo": {"values": [{"_target_": "os.system"}]}}}
    bad_key = {**sweep, "parameters": {"hydra.job.env_set.X": {"value": 1}}}
    bad_program = {"program": "evil.py", "parameters": {}}
    bad_command = {**sweep, "command": ["${env}", "${interpreter}", "evil.py", "${args}"]}
    for bad, word in (
        (bad_value, "os.system"),
        (bad_key, "env_set"),
        (bad_program, "command"),
        (bad_command, "command"),
    ):
        with pytest.raises(UserError) as refused:
            check_definition(bad, "sweep.yaml")
        assert word in str(refused.value)

    (tmp_path / "sweep.yaml").write_text("method: grid\nprogram: evil.py\n")
    result = run_cli("trainlab.wandb_sweep", "--check", "sweep.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: sweep.yaml does not run")


def test_wandb_server_values_reach_the_same_check(tmp_path):
    """A W&B agent writes the server's values as key=value (${args_no_hyphens}): a value that
    Hydra reads as a dict is refused like any command line's."""
    result = run_cli(
        "trainlab.train",
        *TRAIN,
        "model.net.dropout=" + OPEN,
        "+model.net.extra=" + OPEN,
        cwd=tmp_path,
    )
    assert_refused(result, "model.net.dropout", tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        ("hydra.run.dir=/tmp/x y", "hydra.launcher.n_jobs=2", "hydra.verbose=true"),
        ("-m", "hparams_search=seeds", "hydra.sweeper.params.seed='1,2'", "hydra/launcher=process"),
        (
            "-m",
            "hparams_search=optuna_lr_batch",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.pruner=median",
        ),
        ("trainer=ddp_cpu", "callbacks=default", "+data.train_transforms=[]"),
        (
            "+x=${optimizer.lr}",
            "paths.log_dir=${oc.env:HOME}/logs",
            "hydra.run.dir=out/run.${seed}",
        ),
    ],
)
def test_legitimate_command_lines_pass(args):
    check_command_line("train", list(args))


@pytest.mark.parametrize(
    "argv",
    [
        ["-cn", "../../tmp/evil/x"],
        ["--config-name", "nonexistent"],
        ["-m", "hydra/launcher=../../../tmp/evil/x"],
        ["hydra/job_logging=../x"],
        ["+callbacks@hydra.callbacks=default"],
        ["+model@_global_.hydra.callbacks=mlp"],
    ],
)
def test_configs_from_or_into_places_out_of_reach_are_refused(argv):
    with pytest.raises(UserError, match="is refused"):
        check_command_line("train", argv)
