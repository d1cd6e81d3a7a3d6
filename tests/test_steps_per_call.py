"""steps_per_call: N optimizer steps per trip through Lightning's loop train what one step per
call trains, to the bit (CPU, same seed, real Trainer on the bundled digits): the same weights,
step counts, learning rate after every step, epoch means, checkpoints and resumption."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainlab.engine.callbacks import RunInfo, checkpoints
from trainlab.engine.errors import UserError

PER_EPOCH = 21  # digits' training split in batches of 64: blocks of 4 leave one of 1


class Record(pl.Callback):
    """The learning rate after every optimizer step, the steps at which checkpoints are saved,
    and at which calls end; optionally saves a checkpoint and stops at step `stop_at`."""

    def __init__(self, stop_at: int | None = None, path: Path | None = None):
        self.stop_at, self.path = stop_at, path
        self.lrs, self.saved, self.call_ends = [], [], []

    def on_train_start(self, trainer, pl_module):
        # torch's own hook, not Lightning's: one that Lightning dispatches would make blocks
        # take Lightning's per-step wrappers (trainlab.engine.blocks.direct), which is not the point
        trainer.optimizers[0].register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])  # the rate of this step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.call_ends.append(trainer.global_step)
        if trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer, pl_module, ckpt):
        self.saved.append(trainer.global_step)


def fit(cfg, n, record: Record, ckpt_path=None, every=None, epochs=2, **trainer_args):
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    stored = checkpoints.CheckpointRecord()
    stored.run_info = RunInfo(config=OmegaConf.to_container(cfg, resolve=True))
    callbacks = [stored, record]
    if every:
        callbacks.append(checkpoints.LastCheckpoint(every))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(every),  # LastCheckpoint is a Checkpoint
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=Path(cfg.paths.log_dir) / f"n{n}",  # where LastCheckpoint writes
        log_every_n_steps=20,  # step logs (every 20 steps) end blocks of 4
        **trainer_args,
    )
    model = instantiate(
        cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
    )
    model.steps_per_call = n
    trainer.fit(model, datamodule=instantiate(cfg.data), ckpt_path=ckpt_path, weights_only=True)
    return trainer, model


def assert_same_run(a, b) -> None:
    (trainer_a, model_a), (trainer_b, model_b) = a, b
    for name, value in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[name], value), name
    assert trainer_b.global_step == trainer_a.global_step
    metrics = {k: float(v) for k, v in trainer_a.callback_metrics.items()}
    assert {k: float(v) for k, v in trainer_b.callback_metrics.items()} == metrics
    assert "train/loss_epoch" in metrics and "val/acc" in metrics


def test_blocks_of_four_train_the_same_weights_steps_and_schedule(compose):
    cfg = compose()
    one, four = Record(), Record()
    run_one, run_four = fit(cfg, 1, one), fit(cfg, 4, four)
    assert run_four[1].steps_per_call_choice == {"steps_per_call": 4, "why": "as set"}
    assert_same_run(run_one, run_four)
    assert run_four[1]._direct is not None  # without Lightning's per-step wrappers
    assert run_one[0].global_step == 2 * PER_EPOCH
    # the cosine schedule stepped after every optimizer step, through the same rates
    assert len(four.lrs) == 2 * PER_EPOCH and four.lrs == one.lrs
    assert len(set(one.lrs)) > PER_EPOCH  # it did move
    # Lightning's loop ran once a block, 7 calls an epoch: blocks end on every multiple of 4
    # of the run's steps, one is split where none falls (1; 22) and epochs end (21, 42)
    assert four.call_ends == [1, 4, 8, 12, 16, 20, 21, 22, 24, 28, 32, 36, 40, 42]


class BackwardHook(Record):
    def on_before_backward(self, trainer, pl_module, loss):
        self.saved.append(trainer.global_step)


def test_a_callback_with_per_step_hooks_gets_them_every_step_in_blocks_too(compose):
    cfg = compose()
    one, four = BackwardHook(), BackwardHook()
    reference, blocks = fit(cfg, 1, one, epochs=1), fit(cfg, 4, four, epochs=1)
    assert blocks[1]._direct is None  # Lightning's wrappers, which call the hook
    assert four.saved == one.saved == list(range(PER_EPOCH))
    assert_same_run(reference, blocks)


def test_auto_records_its_measured_choice_and_trains_the_same(compose):
    cfg = compose()
    reference = fit(cfg, 1, Record(), epochs=1)
    auto = fit(cfg, "auto", Record(), epochs=1)
    choice = auto[1].steps_per_call_choice
    assert choice["why"].startswith("auto: a step takes")
    assert 20 % choice["steps_per_call"] == 0  # it fits log_every_n_steps=20
    assert_same_run(reference, auto)


def test_checkpoints_at_the_same_steps_and_a_count_that_does_not_fit_is_lowered(compose):
    cfg = compose()
    one, blocks = Record(), Record()
    fit(cfg, 1, one, every=6, epochs=1)
    trainer, model = fit(cfg, 4, blocks, every=6, epochs=1)  # 4 does not divide 6 and 20: 2
    assert model.steps_per_call_choice["steps_per_call"] == 2
    assert "checkpoint_every_n_steps=6" in model.steps_per_call_choice["why"]
    assert blocks.saved == one.saved == [6, 12, 18, PER_EPOCH]


def test_a_run_resumed_at_a_step_that_is_not_a_multiple_of_n_ends_as_one_uninterrupted(
    compose, tmp_path
):
    cfg = compose()
    straight = fit(cfg, 1, Record())
    ckpt = tmp_path / "mid.ckpt"
    stop_at = PER_EPOCH + 1  # 22: one step into the second epoch, not a multiple of 4
    fit(cfg, 4, Record(stop_at, ckpt))
    assert torch.load(ckpt, weights_only=True)["global_step"] == stop_at
    resumed_record = Record()
    resumed = fit(cfg, 4, resumed_record, ckpt_path=ckpt)
    assert resumed[1].steps_per_call_choice["steps_per_call"] == 4
    assert resumed_record.call_ends == [24, 28, 32, 36, 40, 42]  # the rest of the epoch
    assert_same_run(straight, resumed)


def test_a_checkpoint_keeps_its_count_on_resume(compose, tmp_path):
    cfg = compose()
    ckpt = tmp_path / "one.ckpt"
    fit(cfg, 1, Record(7, ckpt))  # one step per call
    _, model = fit(cfg, 4, Record(), ckpt_path=ckpt)
    assert model.steps_per_call_choice["steps_per_call"] == 1
    assert model.steps_per_call_choice["why"] == "as in the checkpoint resumed from"


@pytest.mark.parametrize(
    ("trainer_args", "why"),
    [
        ({"gradient_clip_val": 1e12}, "clipping need Lightning's loop"),
        ({"accumulate_grad_batches": 2}, "accumulation"),
        ({"val_check_interval": 0.5}, "fractional"),
    ],
)
def test_what_counts_lightnings_batches_keeps_one_step_per_call(compose, trainer_args, why):
    _, model = fit(compose(), 8, Record(), epochs=1, **trainer_args)
    assert model.steps_per_call_choice["steps_per_call"] == 1
    assert why in model.steps_per_call_choice["why"]


def test_an_integer_val_check_interval_validates_at_the_same_steps(compose):
    class Validations(Record):
        def on_validation_start(self, trainer, pl_module):
            self.saved.append(trainer.global_step)

    one, blocks = Validations(), Validations()
    cfg = compose("data.batch_size=68")  # 1293 samples: 20 batches, the last one short
    fit(cfg, 1, one, epochs=1, val_check_interval=8)
    _, model = fit(cfg, 4, blocks, epochs=1, val_check_interval=8)
    assert model.steps_per_call_choice["steps_per_call"] == 4
    assert blocks.saved == one.saved == [0, 8, 16]  # 0: the sanity check
    # an epoch that blocks of 4 do not fill: validation would come at its end too
    cfg = compose()
    fit(cfg, 1, one, epochs=1, val_check_interval=8)
    _, model = fit(cfg, 4, blocks, epochs=1, val_check_interval=8)
    assert model.steps_per_call_choice["steps_per_call"] == 1
    assert "the epoch's batches=21" in model.steps_per_call_choice["why"]
    assert blocks.saved == one.saved == [0, 8, 16, 0, 8, 16]


def test_the_divergence_guard_names_the_same_step(compose, tmp_path):
    from trainlab.engine.callbacks.guards import StopOnNonFiniteLoss

    cfg = compose("optimizer.lr=50", "scheduler=none")
    errors = []
    for n in (1, 4):
        guard = StopOnNonFiniteLoss(divergence_factor=10)
        with pytest.raises(UserError) as caught:
            _fit_guarded(cfg, n, guard)
        errors.append(str(caught.value))
    assert "step" in errors[0] and errors[0] == errors[1]


def _fit_guarded(cfg, n, guard) -> None:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=None)
    model.steps_per_call = n
    trainer.fit(model, datamodule=instantiate(cfg.data))


def read_csv(run_dir: Path) -> list[dict]:
    (path,) = run_dir.rglob("metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_records_the_choice_and_logs_the_same_curves(tmp_path):
    args = ("logger=csv", "trainer.max_epochs=3", "trainer.log_every_n_steps=10", "test=false")
    runs = {}
    for value in ("1", "auto"):
        run_dir = tmp_path / f"run {value}"  # a space in the path, as users have them
        result = run_cli(
            "trainlab.train",
            *args,
            f"steps_per_call={value}",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((run_dir / "metrics.json").read_text())
        runs[value] = record, read_csv(run_dir)
    (one, one_csv), (auto, auto_csv) = runs["1"], runs["auto"]
    assert one["steps_per_call"] == {"steps_per_call": 1, "why": "as set"}
    assert auto["steps_per_call"]["steps_per_call"] in (2, 5, 10)
    assert auto["steps"] == one["steps"] == 3 * PER_EPOCH
    assert auto["val/acc_best"] == one["val/acc_best"]
    assert [r["step"] for r in auto_csv] == [r["step"] for r in one_csv]
    step_losses = [(r["step"], r["train/loss_step"]) for r in one_csv if r["train/loss_step"]]
    assert len(step_losses) == 6  # steps 9, 19, ... 59
    assert step_losses == [
        (r["step"], r["train/loss_step"]) for r in auto_csv if r["train/loss_step"]
    ]
