"""Is the template as fast as a hand-written PyTorch loop? This script trains the same net on the
same data

  (i)   through the template: trainlab.train.train() on a config composed from conf/, as
        `python -m trainlab.train` would build it, with the default callbacks and the CSV logger;
  (ii)  through a minimal hand-written loop in best plain practice: the training split as one
        normalised tensor in memory, batches by index, zero_grad(set_to_none=True), the same
        net (initialised alike), optimizer, schedule, order of samples, threads and batch size;
  (iii) at the compute floor: forward, backward and optimizer step on one fixed batch;

all in this one process, and prints samples per second and the ratios template/raw and
template/floor. Only training steps are timed, after a warm-up: the template's clock skips the
gap between epochs (validation, checkpoints), whose cost the `epoch` and `accuracy` parts
measure. Rounds alternate floor, raw and template, and the best round of each counts, so that a
burst of load from another process does not decide a ratio; the process keeps freed memory in
its heap (`steady_malloc`), for all three alike.

  python bench/throughput.py --quick      # throughput only, about 5 minutes on 2 CPU cores
  python bench/throughput.py              # all parts: throughput, overhead (what each default
                                          # costs a step), epoch, accuracy, startup
  python bench/throughput.py --parts overhead,epoch
  python bench/throughput.py --device cuda --precision bf16-mixed --channels-last

MNIST-sized data: the real MNIST under --data-dir when it is there, else 70,000 28x28 digits
generated from scikit-learn's (written once to bench/data/ in MNIST's own file format, and read
by the template's mnist config like the real files). CIFAR-10-sized: the real files when there,
else 60,000 random 3x32x32 images (throughput only) behind the cifar10 config.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from trainlab.data.augment import crop_flip
from trainlab.data.vision import CIFAR10DataModule
from trainlab.engine import compute
from trainlab.engine.commands import override
from trainlab.models.schedulers import cosine

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "bench" / "data"  # generated stand-ins, never mixed with real data


# --- data -------------------------------------------------------------------------------------


def mnist_dir(data_dir: Path) -> tuple[Path, str]:
    """The folder holding MNIST/raw/, and what it holds: real MNIST, or digits generated once."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if all((data_dir / "MNIST" / "raw" / n).is_file() for n in names):
        return data_dir, "MNIST"
    raw = GENERATED / "MNIST" / "raw"
    if not all((raw / n).is_file() for n in names):
        print(f"generating an MNIST-sized data set in {raw} ...", flush=True)
        write_generated_mnist(raw)
    return GENERATED, "generated digits, MNIST-sized"


def write_generated_mnist(raw: Path) -> None:
    """60,000 + 10,000 28x28 digits: scikit-learn's 8x8 digits under random rotation (+-15
    degrees), scale and shift, with noise; test images come from digits never seen in training.
    Written as MNIST's uncompressed IDX files, so torchvision reads them as it reads the real ones.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    labels = torch.tensor(digits.target, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=g)
    pools = {"train": order[:1400], "t10k": order[1400:]}
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        pool = pools[prefix]
        pick = pool[torch.randint(len(pool), (n,), generator=g)]
        x = torch.cat([_warp(images[chunk], g) for chunk in pick.split(10000)])
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[pick])


def _warp(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(images)
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(30)
    scale = 1.4 * (0.9 + 0.2 * torch.rand(n, generator=g))  # a digit spans about 20 of 28 pixels
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.3
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
    x = F.grid_sample(images, grid, align_corners=False) * 255
    x += torch.randn(x.shape, generator=g) * 12
    return x.clamp(0, 255).round().to(torch.uint8)


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


class GeneratedCIFAR10(CIFAR10DataModule):
    """The cifar10 config's data module (splits, augmentation, normalisation) over random images."""

    _cache: dict = {}

    def prepare_data(self) -> None:
        pass

    def load(self):
        if not self._cache:
            g = torch.Generator().manual_seed(0)
            for split, n in (("train", 50000), ("test", 10000)):
                x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
                self._cache[split] = (x, torch.randint(0, 10, (n,), generator=g))
        return dict(self._cache)


def cifar_overrides(data_dir: Path) -> tuple[list[str], str]:
    if (data_dir / "cifar-10-batches-py" / "data_batch_5").is_file():
        files = ["data=cifar10", override("paths.data_dir", data_dir), "data.download=false"]
        return files, "CIFAR-10"
    return ["data=cifar10", "data._target_=__main__.GeneratedCIFAR10"], "random, CIFAR-10-sized"


# --- the three ways to train ------------------------------------------------------------------


@dataclass
class Case:
    model: str  # mlp or cnn
    data: str  # mnist or cifar10
    batch: int
    data_overrides: list[str]
    device: str
    precision: str
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.model} {self.data} bs{self.batch}"

    def overrides(self) -> list[str]:
        o = [f"model={self.model}", *self.data_overrides, f"data.batch_size={self.batch}"]
        o += ["logger=csv", "test=false"]
        if self.device == "cuda":
            o += ["trainer=gpu"]
        if self.precision != "32":
            o += [f"trainer.precision={self.precision}"]
        if self.channels_last and self.model == "cnn":
            o += ["model.channels_last=true"]
        return o


def compose(*overrides: str):
    from hydra import initialize_config_dir

    from trainlab.engine.config import CONF_DIR, compose_with_parameters

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="bench"):
        return compose_with_parameters("train", list(overrides))


def allow_bench_targets() -> None:
    """train() builds only the _target_s that conf/ names; the benchmark's timers, data and
    model variants live here, in this process: allowed for it alone."""
    from trainlab.engine import config

    here = vars(sys.modules["__main__"])
    allowed = config.known_targets() | {
        f"__main__.{name}" for name, value in here.items() if isinstance(value, type)
    }
    config.known_targets = lambda: allowed


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Times `steps` training steps after `warmup`: the sum of the intervals between the starts of
    consecutive steps of the same epoch (so the gap between epochs is left out), then stops."""

    last: StepTimer | None = None

    def __init__(self, warmup: int, steps: int, device: str = "cpu"):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.seconds, self.samples, self.counted = 0.0, 0, 0
        self._previous: tuple[float, int, int, int] | None = None  # time, batch_idx, samples, steps
        StepTimer.last = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.warmup:
            return
        sync(self.device)
        now = time.perf_counter()
        if self._previous is not None and batch_idx == self._previous[1] + 1:
            self.seconds += now - self._previous[0]
            self.samples += self._previous[2]
            self.counted += self._previous[3]
        # a call takes one batch, or a block of them (steps_per_call): samples and steps
        pairs = batch if isinstance(batch, list) else [batch]
        self._previous = (now, batch_idx, sum(len(y) for _, y in pairs), len(pairs))
        if self.counted >= self.steps:
            trainer.should_stop = True

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


@contextlib.contextmanager
def quiet():
    """The template's console output (config tree, epoch lines) out of the benchmark's."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def template(case: Case, warmup: int, steps: int, *extra: str) -> float:
    from trainlab.train import train

    timer = "+callbacks.timer._target_=__main__.StepTimer"
    knobs = [f"+callbacks.timer.{k}={v}" for k, v in (("warmup", warmup), ("steps", steps))]
    knobs.append(f"+callbacks.timer.device={case.device}")
    # The timer's stop asks Lightning for one last validation, after the timed steps: left out
    # (the epoch part measures it), as it would take longer than the timing itself for the CNN.
    knobs.append("+trainer.limit_val_batches=0")
    cfg = compose(*case.overrides(), timer, *knobs, *extra)
    with tempfile.TemporaryDirectory() as run_dir, quiet():
        record = train(cfg, run_dir)
    template.steps_per_call = record["steps_per_call"]["steps_per_call"]  # the last run's
    return StepTimer.last.rate


class Plain:
    """The template's config as plain PyTorch: the same net, initialised from the same seed, the
    same optimizer and schedule, the training split as one normalised tensor on the device, and
    the same order of samples as the template's (a DistributedSampler's for one device)."""

    def __init__(self, case: Case, total_steps: int | None = None):
        cfg = compose(*case.overrides())
        self.seed = cfg.seed
        torch.manual_seed(self.seed)
        self.device = torch.device(case.device)
        self.net = instantiate(cfg.model.net).to(self.device)
        self.memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
        if case.channels_last and case.model == "cnn":
            self.net.to(memory_format=torch.channels_last)
        self.optimizer = instantiate(cfg.optimizer)(params=self.net.parameters())
        self.bf16 = case.precision.startswith("bf16")
        self.batch = case.batch
        self.augment = bool(cfg.data.get("augment"))
        self.crops = torch.Generator(device=self.device).manual_seed(self.seed)
        self.dm = _datamodule(cfg)
        self.x, self.y = [t.to(self.device) for t in self.dm.splits["train"].tensors]
        if not self.augment:  # normalised once; with augmentation, after each batch's crop
            self.x = self.normalise(self.x)
        self.steps_per_epoch = math.ceil(len(self.x) / self.batch)
        self.scheduler = cosine(self.optimizer, total_steps=total_steps or self.steps_per_epoch)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        # the template's arithmetic, so that both see the same inputs to the last bit
        mean = torch.tensor(self.dm.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.dm.std, device=x.device).view(1, -1, 1, 1)
        x = x.float().mul_(1 / (255 * std)).add_(-mean / std)
        return x.contiguous(memory_format=self.memory_format)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def epoch(self, index: int):
        """Yields the batches of epoch `index`, augmented when the config says so."""
        shuffle = torch.Generator().manual_seed(self.seed + index)
        order = torch.randperm(len(self.x), generator=shuffle).to(self.device)
        for i in range(0, len(order), self.batch):
            batch = order[i : i + self.batch]
            x = self.x.index_select(0, batch)
            if self.augment:
                x = self.normalise(crop_flip(x, self.crops))
            yield x, self.y.index_select(0, batch)


_datamodules: dict[str, object] = {}


def _datamodule(cfg):
    """The data module set up for fitting, read from disk once per data set: every loop and round
    of a case, and every batch size, trains on the same tensors."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    key = repr({k: v for k, v in data.items() if k != "batch_size"})
    if key not in _datamodules:
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        _datamodules[key] = dm
    return _datamodules[key]


def raw(case: Case, warmup: int, steps: int, lightning_env: bool = False) -> float:
    # As in a script that never imports Lightning, whose import makes torch ask NVML whether
    # CUDA is there on every Adam step of a CPU run (unless lightning_env, to measure that).
    with contextlib.nullcontext() if lightning_env else compute.torch_cuda_check():
        plain = Plain(case, total_steps=warmup + steps)
        done, samples, started, epoch = 0, 0, 0.0, 0
        plain.net.train()
        while done < warmup + steps:
            for x, y in plain.epoch(epoch):
                if done == warmup:
                    sync(case.device)
                    started = time.perf_counter()
                plain.step(x, y)
                done += 1
                samples += len(y) if done > warmup else 0
                if done == warmup + steps:
                    break
            epoch += 1
        sync(case.device)
        return samples / (time.perf_counter() - started)


def bare_lightning(case: Case, warmup: int, steps: int) -> float:
    """Lightning's loop and nothing else: the raw loop's net, optimizer, schedule and batches
    in a minimal LightningModule, with no logger, callbacks, progress bar or checkpoints."""
    import lightning.pytorch as pl

    plain = Plain(case, total_steps=warmup + steps)

    class Batches:
        def __len__(self) -> int:
            return plain.steps_per_epoch

        def __iter__(self):
            yield from plain.epoch(0)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = plain.net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            scheduler = {"scheduler": plain.scheduler, "interval": "step"}
            return {"optimizer": plain.optimizer, "lr_scheduler": scheduler}

    timer = StepTimer(warmup, steps, case.device)
    trainer = pl.Trainer(
        accelerator=case.device,
        devices=1,
        precision=case.precision if case.precision != "32" else "32-true",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    with quiet():
        trainer.fit(Module(), train_dataloaders=Batches())
    return timer.rate


def floor(case: Case, warmup: int, steps: int) -> float:
    with compute.torch_cuda_check():
        plain = Plain(case, total_steps=warmup + steps)
        x, y = next(plain.epoch(0))
        plain.net.train()
        for i in range(warmup + steps):
            if i == warmup:
                sync(case.device)
                started = time.perf_counter()
            plain.step(x, y)
        sync(case.device)
        return steps * case.batch / (time.perf_counter() - started)


# --- the parts ---------------------------------------------------------------------------------


def plan(case: Case, seconds: float, min_steps: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) for about `seconds` of timing, from a probe of the floor."""
    rate = floor(case, 2, 3)
    step_s = case.batch / rate
    return max(3, min(30, math.ceil(0.3 / step_s))), max(min_steps, math.ceil(seconds / step_s))


def throughput(cases: list[Case], seconds: float, rounds: int, min_steps: int) -> list[float]:
    print("\n## Throughput (training samples per second, best of rounds)\n")
    print("The template with one optimizer step per call of Lightning's loop (steps_per_call=1),")
    print("and with its default, steps_per_call=auto (N: what auto chose).\n")
    print(
        "| case | floor | raw loop | template, 1 step a call | template, auto | N "
        "| 1 step a call / raw | template/raw | template/floor |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for case in cases:
        warmup, steps = plan(case, seconds, min_steps)
        rates = {"floor": [], "raw": [], "one": [], "template": []}
        for _ in range(rounds):
            rates["floor"].append(floor(case, warmup, steps))
            rates["raw"].append(raw(case, warmup, steps))
            rates["one"].append(template(case, warmup, steps, "steps_per_call=1"))
            rates["template"].append(template(case, warmup, steps))
        f, r, one, t = (max(rates[k]) for k in ("floor", "raw", "one", "template"))
        ratios.append(t / r)
        print(
            f"| {case.name} | {f:,.0f} | {r:,.0f} | {one:,.0f} | {t:,.0f} "
            f"| {template.steps_per_call} | {one / r:.2f} | {t / r:.2f} | {t / f:.2f} |"
        )
    return ratios


def overhead(case: Case, seconds: float, rounds: int) -> None:
    """What each default costs per step, against the template's defaults, on the case where
    overhead weighs most (a small MLP at a small batch)."""
    warmup, steps = plan(case, seconds, min_steps=100)
    variants = {  # name: (overrides, progress bar drawn as in a terminal)
        "defaults (CSV logger)": ([], None),
        "steps_per_call=1 (Lightning's loop every step)": (["steps_per_call=1"], None),
        "logger=wandb (offline)": (["logger=wandb"], None),
        "callbacks=none": (["callbacks=none"], None),
        "+trainer.enable_model_summary=false": (["+trainer.enable_model_summary=false"], None),
        # clipping at a norm no gradient reaches: the same step, through Lightning's automatic
        # optimisation (its closure and hooks) instead of the classifier's plain step
        "Lightning's automatic optimisation": (["+trainer.gradient_clip_val=1e12"], None),
        "in a terminal: the template's bar (LiveBar)": ([], "template"),
        "in a terminal: Lightning's RichProgressBar": ([], "lightning"),
        "trainer.log_every_n_steps=1": (["trainer.log_every_n_steps=1"], None),
        "trainer.log_every_n_steps=10": (["trainer.log_every_n_steps=10"], None),
        "self.log every step (Lightning's usual)": (
            ["model._target_=__main__.LogEveryStep", "steps_per_call=1"],  # its own step
            None,
        ),
        "torchmetrics accuracy every step": (
            ["model._target_=__main__.MetricEveryStep", "steps_per_call=1"],
            None,
        ),
        "data.loader=dataloader": (["data.loader=dataloader"], None),
        "data.loader=dataloader data.num_workers=1": (
            ["data.loader=dataloader", "data.num_workers=1"],
            None,
        ),
    }
    results = {name: [] for name in variants}
    results["raw loop"], results["raw loop with Lightning's NVML check"] = [], []
    bare, bare_torch_check = (
        "Lightning's bare loop, around the raw loop's step",
        "the same, torch's CUDA check",
    )
    results[bare], results[bare_torch_check] = [], []
    for _ in range(rounds):
        results["raw loop"].append(raw(case, warmup, steps))
        nvml = raw(case, warmup, steps, lightning_env=True)
        results["raw loop with Lightning's NVML check"].append(nvml)
        results[bare].append(bare_lightning(case, warmup, steps))
        with compute.torch_cuda_check():  # as the template trains on the CPU
            results[bare_torch_check].append(bare_lightning(case, warmup, steps))
        for name, (extra, bar) in variants.items():
            with live_progress_bar(bar) if bar else contextlib.nullcontext():
                results[name].append(template(case, warmup, steps, *extra))
    base = max(results["defaults (CSV logger)"])
    print(f"\n## Overhead per step ({case.name}, against the template's defaults)\n")
    print("| variant | samples/s | ms per step vs defaults | vs raw loop |")
    print("| --- | ---: | ---: | ---: |")
    raw_rate = max(results["raw loop"])
    for name, rates in results.items():
        rate = max(rates)
        extra_ms = (case.batch / rate - case.batch / base) * 1e3
        print(f"| {name} | {rate:,.0f} | {extra_ms:+.3f} | {rate / raw_rate:.2f} |")


def epoch_parts(case: Case, rounds: int) -> None:
    """What a whole epoch of the defaults spends beyond training steps: validation, checkpoints."""
    variants = {
        "defaults": [],
        "trainer.limit_val_batches=0 (no validation)": ["+trainer.limit_val_batches=0"],
        "callbacks=none (no checkpoints)": ["callbacks=none"],
        "both": ["+trainer.limit_val_batches=0", "callbacks=none"],
    }
    clock = ["+callbacks.clock._target_=__main__.EpochClock", "trainer.max_epochs=2"]
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    from trainlab.train import train

    for _ in range(rounds):
        for name, extra in variants.items():
            cfg = compose(*case.overrides(), *clock, *extra)
            with tempfile.TemporaryDirectory() as run_dir, quiet():
                train(cfg, run_dir)
            seconds[name].append(EpochClock.last.seconds[-1])  # the second epoch: warm
    base = min(seconds["both"])
    print(f"\n## A whole epoch ({case.name}, the second of two, best of {rounds})\n")
    print("| variant | seconds | vs training steps only |")
    print("| --- | ---: | ---: |")
    for name, values in seconds.items():
        print(f"| {name} | {min(values):.3f} | {min(values) / base - 1:+.1%} |")


class EpochClock(Callback):
    """Seconds from each training epoch's start to its end (validation and checkpoints inside)."""

    last: EpochClock | None = None

    def __init__(self):
        self.seconds: list[float] = []
        EpochClock.last = self

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


@contextlib.contextmanager
def live_progress_bar(bar: str):
    """A terminal's progress bar, drawn to /dev/null as if it were a terminal: the template's
    (`LiveBar`) or Lightning's own RichProgressBar."""
    import rich
    from lightning.pytorch.callbacks import RichProgressBar

    import trainlab.engine.callbacks.progress

    saved = trainlab.engine.callbacks.progress.progress_bar
    cls = trainlab.engine.callbacks.progress.LiveBar if bar == "template" else RichProgressBar
    with open(os.devnull, "w") as devnull:
        console = {"file": devnull, "force_terminal": True, "width": 120}
        trainlab.engine.callbacks.progress.progress_bar = lambda: cls(console_kwargs=console)
        try:
            yield
        finally:
            trainlab.engine.callbacks.progress.progress_bar = saved
            rich.reconfigure()  # the bar pointed Rich's shared console at /dev/null


def accuracy(case: Case, target: float, epochs: int) -> None:
    """Seconds of training until the test accuracy first reaches `target`, probed after each
    epoch (the probe's own time left out). The template's clock runs over its defaults (per-epoch
    validation, checkpoints, logging); the raw loop validates each epoch too."""
    cfg_extra = [f"trainer.max_epochs={epochs}", "+callbacks.clock._target_=__main__.AccuracyClock"]
    cfg_extra += [f"+callbacks.clock.target={target}", f"+callbacks.clock.device={case.device}"]
    cfg = compose(*case.overrides(), *cfg_extra)
    from trainlab.train import train

    with tempfile.TemporaryDirectory() as run_dir, quiet():
        train(cfg, run_dir)
    clock = AccuracyClock.last
    t_template, e_template = clock.reached if clock.reached else (math.nan, None)
    t_raw, e_raw, history = _raw_to_accuracy(case, target, epochs)
    print(f"\n## Time to {target:.0%} test accuracy ({case.name}, at most {epochs} epochs)\n")
    print("| | seconds | epochs | test accuracy by epoch |")
    print("| --- | ---: | ---: | --- |")
    for name, t, e, accs in (
        ("template (defaults, CSV logger)", t_template, e_template, clock.history),
        ("raw loop (validating each epoch)", t_raw, e_raw, history),
    ):
        shown = ", ".join(f"{a:.3f}" for a in accs)
        print(f"| {name} | {t:.1f} | {e if e else 'not reached'} | {shown} |")
    print(f"\ntemplate/raw speed to {target:.0%} (raw seconds / template seconds): ", end="")
    print(f"{t_raw / t_template:.2f}")


class AccuracyClock(Callback):
    """Training time (from the first step, probes left out) at which test accuracy >= target."""

    last: AccuracyClock | None = None

    def __init__(self, target: float, device: str = "cpu"):
        self.target, self.device = target, device
        self.started, self.paused = None, 0.0
        self.history: list[float] = []
        self.reached: tuple[float, int] | None = None
        AccuracyClock.last = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(self.device)
        elapsed = time.perf_counter() - self.started - self.paused
        probe = time.perf_counter()
        dm = trainer.datamodule
        dm.setup("test")
        x, y = [t.to(pl_module.device) for t in dm.splits["test"].tensors]
        acc = _accuracy(pl_module, lambda b: dm.on_after_batch_transfer((b, None), 0)[0], x, y)
        self.history.append(acc)
        if acc >= self.target and self.reached is None:
            self.reached = (elapsed, trainer.current_epoch + 1)
            trainer.should_stop = True
        self.paused += time.perf_counter() - probe


def _accuracy(net, normalise, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(normalise(xb)).argmax(1) == yb).sum())
            for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
        )
    net.train(was_training)
    return correct / len(y)


def _raw_to_accuracy(case: Case, target: float, epochs: int):
    with compute.torch_cuda_check():
        plain = Plain(case)
        plain.scheduler = cosine(plain.optimizer, total_steps=epochs * plain.steps_per_epoch)
        dm = plain.dm
        dm.setup("test")
        val = [t.to(plain.device) for t in dm.splits["val"].tensors]
        test = [t.to(plain.device) for t in dm.splits["test"].tensors]
        spent, history, reached = 0.0, [], (math.nan, None)
        for epoch in range(epochs):
            sync(case.device)
            started = time.perf_counter()
            plain.net.train()
            for x, y in plain.epoch(epoch):
                plain.step(x, y)
            _accuracy(plain.net, plain.normalise, *val)  # what a plain loop reports each epoch
            sync(case.device)
            spent += time.perf_counter() - started
            history.append(_accuracy(plain.net, plain.normalise, *test))
            if history[-1] >= target:
                reached = (spent, epoch + 1)
                break
        return *reached, history


def startup(data_overrides: list[str]) -> None:
    """Seconds from launching a process to `--help`'s answer, and to the first optimizer step of
    a one-step run (bench/probe.py prints its time), each the best of three; and, for scale, to
    importing torch and Lightning and nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    one_step = ["+trainer.max_steps=1", "test=false"]
    train = [sys.executable, "-m", "trainlab.train"]
    probe = [sys.executable, str(ROOT / "bench" / "probe.py")]
    commands = {
        "python -m trainlab.train --help": [*train, "--help"],
        "import torch, lightning.pytorch (nothing else)": [
            sys.executable,
            "-c",
            "import time, torch, lightning.pytorch; print(f'imported at {time.time()}')",
        ],
        "first step: defaults (digits, W&B offline)": [*probe, *one_step],
        "first step: logger=csv": [*probe, "logger=csv", *one_step],
        "first step: data=mnist (MNIST-sized) logger=csv": [
            *probe,
            *data_overrides,
            "logger=csv",
            *one_step,
        ],
    }
    print("\n## Start-up (seconds from process start, best of 3)\n")
    print("| to | seconds |")
    print("| --- | ---: |")
    with tempfile.TemporaryDirectory() as cwd:
        for name, command in commands.items():
            times = []
            for _ in range(3):
                started = time.time()
                done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
                marks = re.findall(r"^.* at (\d+\.\d+)$", done.stdout, re.MULTILINE)
                times.append((float(marks[0]) if marks else time.time()) - started)
            print(f"| {name} | {min(times):.2f} |")


def steady_malloc() -> str:
    """Keep freed memory in the process (glibc). By default glibc hands big freed blocks back to
    the system and maps them afresh on the next step: page faults that made a CNN step on this
    machine vary from 115 to 200 ms, against a steady 107 ms without them. All three loops run
    in this process, so all three get the same allocator."""
    if not sys.platform.startswith("linux"):
        return "system default"
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
            return "glibc, blocks up to 32 MiB kept in the heap"
    return "system default"


def machine(args) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} usable cores, torch {torch.__version__}, {torch.get_num_threads()} "
    text += "torch thread(s)"
    if args.device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{text}; load average at start {load:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="throughput only, shorter timings")
    parser.add_argument("--parts", default="throughput,overhead,epoch,accuracy,startup")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32", help="e.g. bf16-mixed (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="for the CNN")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--seconds", type=float, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, help="alternating rounds of raw and template")
    args = parser.parse_args()
    parts = ["throughput"] if args.quick else args.parts.split(",")
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    rounds = args.rounds or 3  # best of 3: two left a ratio's spread at 4% on 2 shared cores
    min_steps = 10 if args.quick else 30

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    allow_bench_targets()
    compute.set_threads("auto")  # what the template's `threads: auto` picks
    allocator = steady_malloc()
    os.environ.setdefault("WANDB_SILENT", "true")
    mnist_root, mnist_kind = mnist_dir(args.data_dir)
    mnist = ["data=mnist", override("paths.data_dir", mnist_root), "data.download=false"]
    cifar, cifar_kind = cifar_overrides(args.data_dir)
    print(f"# trainlab benchmark: {machine(args)}")
    print(f"MNIST-sized data: {mnist_kind}; CIFAR-10-sized data: {cifar_kind}")
    print(f"device {args.device}, precision {args.precision}, channels_last {args.channels_last}")
    print(f"memory allocator: {allocator}")

    def case(model: str, data: str, batch: int) -> Case:
        over = mnist if data == "mnist" else cifar
        return Case(model, data, batch, over, args.device, args.precision, args.channels_last)

    ratios = []
    if "throughput" in parts:
        grid = [(m, d, b) for d in ("mnist", "cifar10") for m in ("mlp", "cnn") for b in (64, 256)]
        cases = [case(*c) for c in grid]
        ratios = throughput(cases, seconds, rounds, min_steps)
    if "overhead" in parts:
        overhead(case("mlp", "mnist", 64), seconds, rounds)
    if "epoch" in parts:
        epoch_parts(case("mlp", "mnist", 128), rounds)
    if "accuracy" in parts:
        accuracy(case("mlp", "mnist", 128), target=0.98, epochs=10)
    if "startup" in parts:
        startup(mnist)
    if ratios:
        print(f"\nmin template/raw ratio: {min(ratios):.2f}")


# Variants of the model for the overhead part: what the usual way of logging would cost.


def _per_step_variants():
    import torch.nn.functional as F  # noqa: N812
    from torchmetrics.classification import MulticlassAccuracy

    from trainlab.models.classifier import Classifier

    class LogEveryStep(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            acc = (logits.argmax(dim=1) == y).float().mean()
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train/acc", acc, on_step=False, on_epoch=True)
            self._plain_step(loss)  # as the template's step takes it
            return loss

        def on_train_epoch_end(self) -> None:
            pass

    class MetricEveryStep(LogEveryStep):
        def __init__(self, net, num_classes, *args, **kwargs):
            super().__init__(net, num_classes, *args, **kwargs)
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            self.train_acc(logits, y)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
            self._plain_step(loss)
            return loss

    return LogEveryStep, MetricEveryStep


if __name__ == "__main__":
    LogEveryStep, MetricEveryStep = _per_step_variants()
    main()
