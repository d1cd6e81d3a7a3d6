"""Every option of every config group composes, passes the checks, and instantiates."""

import pytest
import torch
from hydra.utils import instantiate

from trainlab.config import CONF_DIR, check_targets, check_values, group_options
from trainlab.loggers import build_loggers
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


# Options that do not pair with the default data and model, and what they pair with.
PARTNERS = {
    ("model", "binary_cnn"): ["data=image_folder"],  # one sigmoid output: two classes
    ("model", "lenet"): ["data=image_list"],  # 32x32 inputs
    ("model", "gpt"): ["data=text"],
    ("data", "text"): ["model=gpt"],
}


def check_output_shape(model, cfg) -> None:
    """The model maps a batch of its data's inputs to the outputs its kind promises."""
    from trainlab.classifier import BinaryClassifier, Classifier
    from trainlab.gan import GAN
    from trainlab.language_model import LanguageModel

    if isinstance(model, LanguageModel):
        tokens = torch.zeros(2, cfg.data.block_size, dtype=torch.long)
        assert model(tokens).shape == (2, cfg.data.block_size, cfg.model.net.vocab_size)
    elif isinstance(model, GAN):
        assert model(torch.zeros(2, cfg.model.latent_dim)).shape == (2, *cfg.data.input_shape)
    else:
        assert isinstance(model, Classifier)
        out = model(torch.zeros(2, *cfg.data.input_shape))
        width = 1 if isinstance(model, BinaryClassifier) else cfg.data.num_classes
        assert out.reshape(2, -1).shape == (2, width)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(compose, tmp_path, group, option):
    cfg = compose(f"{group}={option}", *PARTNERS.get((group, option), []))
    check_values(cfg)

    datamodule = instantiate(cfg.data)
    assert datamodule.batch_size == cfg.data.batch_size
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    check_output_shape(model, cfg)

    optimizer = model.make_optimizer(params=model.parameters())
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    # every target a config names is one that stored configs may build
    check_targets(cfg, f"{group}={option}")
    if scheduler is not None:
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

    try:
        loggers = build_loggers(cfg, tmp_path)
    finally:
        _finish_wandb()
    names = {type(logger).__name__ for logger in loggers}
    assert "CSVLogger" in names  # local metrics, whatever the logger
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
    from trainlab.errors import UserError
    from trainlab.schedulers import onecycle

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
