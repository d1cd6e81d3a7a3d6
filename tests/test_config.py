"""Every option of every config group composes, passes the checks, and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainlab.engine.checkpoint import instantiate_model
from trainlab.engine.config import CONF_DIR, check_targets, check_values, group_options
from trainlab.engine.loggers import build_loggers
from trainlab.train import _finish_wandb

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_groups_named_by_the_template_exist():
    for group in (
        "data",
        "model",
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "debug",
        "experiment",
        "hparams_search",
    ):
        assert group in GROUPS
    assert {"adam", "adamw", "sgd"} <= set(group_options("optimizer"))
    assert {"none", "cosine", "onecycle"} <= set(group_options("scheduler"))
    assert {"digits", "mnist", "fashion_mnist", "cifar10"} <= set(group_options("data"))
    assert {"fdr", "overfit", "limit", "profiler"} <= set(group_options("debug"))
    assert {"wandb", "csv", "tensorboard", "many"} <= set(group_options("logger"))


def check_output_shape(model, cfg) -> None:
    """The model maps a batch of its data's inputs to the outputs its kind promises (a fork's
    plain LightningModule promises nothing here: its own test checks it)."""
    from trainlab.engine import TrainlabModule
    from trainlab.models.classifier import BinaryClassifier, Classifier
    from trainlab.models.gan import GAN
    from trainlab.models.language_model import LanguageModel

    if isinstance(model, LanguageModel):
        tokens = torch.zeros(2, cfg.data.block_size, dtype=torch.long)
        assert model(tokens).shape == (2, cfg.data.block_size, cfg.model.net.vocab_size)
    elif isinstance(model, GAN):
        assert model(torch.zeros(2, cfg.model.latent_dim)).shape == (2, *cfg.data.input_shape)
    elif isinstance(model, TrainlabModule):
        assert isinstance(model, Classifier)
        out = model(torch.zeros(2, *cfg.data.input_shape))
        width = 1 if isinstance(model, BinaryClassifier) else cfg.data.num_classes
        assert out.reshape(2, -1).shape == (2, width)


def written(node) -> object:
    return OmegaConf.to_container(node, resolve=False)


def composed_with_partner(compose, group: str, option: str):
    """`group=option` composed with the data a model option builds with (or the model a data
    option does): the default if it fits, else the first option in order that does (a net made
    for 32x32 images, one logit for two classes, a language model for text). Derived from the
    configs, so that a new model or data set needs no entry in a table here."""
    if group not in ("model", "data"):
        return compose(f"{group}={option}")
    other = "data" if group == "model" else "model"
    for candidate in [[]] + [[f"{other}={o}"] for o in group_options(other)]:
        cfg = compose(f"{group}={option}", *candidate)
        try:
            model, _ = instantiate_model(cfg.model, optimizer=instantiate(cfg.optimizer))
            check_output_shape(model, cfg)
        except Exception:  # a shape, a class count or a ${data.key} that does not fit
            continue
        return cfg
    pytest.fail(f"{group}={option} builds with no {other} option")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(compose, tmp_path, group, option):
    cfg = composed_with_partner(compose, group, option)
    check_values(cfg)

    datamodule = instantiate(cfg.data)
    assert datamodule.batch_size == cfg.data.batch_size
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    # built as train() builds it: a plain LightningModule takes no optimizer or scheduler
    model, untaken = instantiate_model(
        cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler
    )
    check_output_shape(model, cfg)

    # every target a config names is one that stored configs may build
    check_targets(cfg, f"{group}={option}")
    if "optimizer" not in untaken:
        optimizer = model.make_optimizer(params=model.parameters())
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    if "optimizer" not in untaken and scheduler is not None:
        sched = scheduler(optimizer, total_steps=10)
        for _ in range(10):
            optimizer.step()
            sched.step()
        assert optimizer.param_groups[0]["lr"] < cfg.optimizer.lr  # both schedules end low

    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):
            instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    else:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        assert trainer.fast_dev_run == cfg.trainer.get("fast_dev_run", False)

    if group != "logger" and written(cfg.logger) == written(compose().logger):
        return  # the default loggers, built by the logger=... cases
    try:
        loggers = build_loggers(cfg, tmp_path)
    finally:
        _finish_wandb()
    names = {type(logger).__name__ for logger in loggers}
    assert "RunCSVLogger" in names  # local metrics, whatever the logger
    if group == "logger":
        expected = {
            "csv": set(),
            "wandb": {"WandbLogger"},
            "tensorboard": {"TensorBoardLogger"},
            "many": {"WandbLogger", "TensorBoardLogger"},
        }[option]
        assert expected <= names


def test_hparams_search_sets_a_sweep(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hparams_search=lr_batch_grid"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"optimizer.lr", "data.batch_size"}
    assert len(str(params["optimizer.lr"]).split(",")) >= 2


def test_experiment_overrides_groups_and_values(compose):
    cfg = compose("experiment=digits_cnn")
    assert cfg.model.net._target_.endswith("SmallCNN")
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.optimizer.lr == 3e-3
    # the command line still wins over the experiment
    assert compose("experiment=digits_cnn", "optimizer.lr=0.1").optimizer.lr == 0.1


def test_onecycle_too_short_to_warm_up_says_what_to_do():
    from trainlab.engine.errors import UserError
    from trainlab.models.schedulers import onecycle

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(UserError, match="only 4 optimizer steps.*scheduler=cosine"):
        onecycle(optimizer, total_steps=4)
    lrs = []
    schedule = onecycle(optimizer, total_steps=8)  # two steps of warm-up: fine
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(lrs) == pytest.approx(0.1) and lrs[0] < lrs[1] and lrs[-1] < lrs[2]


def test_every_key_a_config_writes_is_a_parameter_of_its_target(compose):
    """The command-line check takes a key that no YAML file writes for a parameter of the
    `_target_` above it; the converse: every key a data or model config writes under a
    `_target_` is one the target takes, so none sets a misspelt or stale parameter."""
    from trainlab.engine.parameters import parameters

    def unknown(node, path):
        if isinstance(node, dict):
            accepted = parameters(node["_target_"]) if "_target_" in node else None
            for key, value in node.items():
                if accepted is not None and not key.startswith("_") and key not in accepted:
                    yield f"{path}.{key} ({node['_target_']})"
                yield from unknown(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from unknown(value, f"{path}[{i}]")

    for group in ("data", "model"):
        for option in group_options(group):
            tree = OmegaConf.to_container(compose(f"{group}={option}")[group], resolve=False)
            assert list(unknown(tree, f"{group}={option}:")) == []


def test_a_key_no_yaml_writes_is_set_through_the_targets_parameters(compose):
    from trainlab.engine.config import check_command_line

    argv = ["data=mnist", "data.per_device=true", "model.channels_last=true", "optimizer.lr=0.1"]
    marked = check_command_line("train", argv)
    # Hydra refuses to set a key that is not in the composed config, unless told with ++
    assert marked == [*argv[:1], "++data.per_device=true", "++model.channels_last=true", argv[3]]
    cfg = compose(*marked)
    datamodule = instantiate(cfg.data)
    assert datamodule.per_device is True and datamodule.download is True  # the default
    assert compose(*argv).data.per_device is True  # tests and notebooks compose alike


def test_a_checkpoint_that_names_old_target_paths_still_loads(compose, tmp_path):
    from trainlab.engine import checkpoint
    from trainlab.engine.config import MOVED_TARGETS

    cfg = compose("model=cnn")
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    stored = OmegaConf.to_container(cfg, resolve=True)
    old = {new: old for old, new in MOVED_TARGETS.items()}
    stored["model"]["net"]["_target_"] = old[cfg.model.net._target_]  # trainlab.nets.SmallCNN
    stored["data"]["_target_"] = old[cfg.data._target_]
    path = tmp_path / "old.ckpt"
    torch.save({checkpoint.KEY: {"config": stored}, "state_dict": model.state_dict()}, path)

    ckpt = checkpoint.read(path)
    assert checkpoint.stored_config(ckpt).model.net._target_ == "trainlab.nets.cnn.SmallCNN"
    assert checkpoint.stored_config(ckpt).data._target_ == cfg.data._target_
    rebuilt = checkpoint.build_model(ckpt)
    x = torch.randn(2, *cfg.data.input_shape)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_a_resumed_run_compares_parameters_no_yaml_writes_with_their_defaults(compose):
    from trainlab.engine.checkpoint import config_changes

    current = OmegaConf.to_container(compose(), resolve=True)
    stored = OmegaConf.to_container(compose("data.per_device=true"), resolve=True)
    assert config_changes(stored, current) == {"data.per_device": [True, False]}
    stored["data"]["per_device"] = False  # what configs wrote before: the default
    stored["data"]["loader"] = "memory"
    assert config_changes(stored, current) == {}


def test_each_config_file_is_parsed_once_and_again_when_edited(tmp_path, monkeypatch):
    """Compositions share what the files parsed to (hydra_plugins' config_files), each getting
    its own copy; a file edited since is parsed anew."""
    import shutil

    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    parsed = []
    load = OmegaConf.load

    def counting_load(file):
        parsed.append(Path(getattr(file, "name", file)))
        return load(file)

    monkeypatch.setattr(OmegaConf, "load", counting_load)
    with initialize_config_dir(str(conf), version_base="1.3"):
        first = compose("train", ["optimizer=sgd"])
        ours = [p for p in parsed if p.is_relative_to(conf)]
        assert conf / "optimizer" / "sgd.yaml" in ours
        first.optimizer.lr = 123.0  # what a run does to its config stays its own
        parsed.clear()
        again = compose("train", ["optimizer=sgd"])
        assert not parsed  # neither these files nor Hydra's own, in its package
        assert again.optimizer.lr != 123.0
        sgd = conf / "optimizer" / "sgd.yaml"
        sgd.write_text(sgd.read_text().replace("momentum: 0.9", "momentum: 0.85"))
        edited = compose("train", ["optimizer=sgd"])
        assert [p for p in parsed if p.is_relative_to(conf)] == [sgd]
        assert edited.optimizer.momentum == 0.85
