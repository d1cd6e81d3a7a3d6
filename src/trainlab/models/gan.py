"""The LightningModule for a GAN: a generator and a discriminator trained in turn on each batch,
by hand (Lightning's manual optimisation), with a grid of samples saved every epoch."""

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn
from torchvision.io import write_png
from torchvision.utils import make_grid

from trainlab.engine import TrainlabModule, UserError, log_image
from trainlab.models.schedulers import total_steps


class GAN(TrainlabModule):
    """Non-saturating GAN training of `generator` against `discriminator`, one step of each per
    batch. Real images are mapped onto the generator's tanh range, [-1, 1], before the
    discriminator sees them.

    `optimizer` builds both optimizers (the same settings for each); `scheduler`, when given,
    builds one schedule per optimizer, both stepped once per batch. Logged once an epoch:
    train/d_loss, train/g_loss, and the discriminator's mean probability of "real" on real
    images (train/d_real, D(x)) and on generated ones before its step (train/d_fake, D(G(z))).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        latent_dim: PositiveInt,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_samples: PositiveInt = 64,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        # The latent batch behind every epoch's grid: a buffer, so that it is in checkpoints and
        # a resumed run goes on drawing the same samples.
        self.register_buffer("fixed_z", torch.randn(num_samples, latent_dim))
        self._to_tanh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def net(self) -> nn.Module:
        """What `compile=true` compiles: the generator (the discriminator stays eager)."""
        return self.generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def on_train_start(self) -> None:
        super().on_train_start()
        # The data modules hand out (x - mean) / std of images on the 0..1 scale; the generator
        # draws in [-1, 1]. So real batches become 2 (x std + mean) - 1 = x (2 std) + (2 mean - 1),
        # one multiply-add with constants made here, on the training device.
        datamodule = self.trainer.datamodule
        if not (hasattr(datamodule, "mean") and hasattr(datamodule, "std")):
            raise UserError(
                "the GAN needs a data module with the `mean` and `std` its batches are "
                "normalised with (every trainlab data module has them): train it with "
                "trainer.fit(model, datamodule=...)."
            )
        mean = torch.tensor(datamodule.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(datamodule.std, device=self.device).view(1, -1, 1, 1)
        self._to_tanh = (2 * std, 2 * mean - 1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        scale, shift = self._to_tanh
        real = x * scale + shift
        opt_d, opt_g = self.optimizers()
        fake = self.generator(torch.randn(len(real), self.latent_dim, device=real.device))

        # The discriminator learns real -> 1, generated -> 0 (no gradient into the generator).
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_loss = d_loss + F.binary_cross_entropy_with_logits(
            fake_logits, torch.zeros_like(fake_logits)
        )
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        # The generator, non-saturating: maximise log D(G(z)) rather than minimise
        # log(1 - D(G(z))), whose gradient vanishes while D rejects the samples easily. The
        # discriminator is frozen meanwhile, so that no gradient of its weights is computed.
        self.discriminator.requires_grad_(False)
        gen_logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.discriminator.requires_grad_(True)

        if self.make_scheduler is not None:  # manual optimisation steps the schedules too
            for scheduler in self.lr_schedulers():
                scheduler.step()

        means = {
            "train/d_loss": d_loss,
            "train/g_loss": g_loss,
            "train/d_real": torch.sigmoid(real_logits).mean(),
            "train/d_fake": torch.sigmoid(fake_logits).mean(),
        }
        self.add_to_epoch_means({k: v.detach() * len(real) for k, v in means.items()}, len(real))
        # What the non-finite-loss guard checks: a NaN in either loss shows in the sum.
        return d_loss.detach() + g_loss.detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # the epoch's means, if not logged yet
        if self.trainer.is_global_zero:
            self._save_samples()

    @torch.no_grad()
    def sample(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """Images on the 0..1 scale for the latent batch `z` (the fixed one by default), drawn
        with the generator in eval mode (batch norm on its running statistics)."""
        was_training = self.generator.training
        self.generator.eval()
        images = self.generator(self.fixed_z if z is None else z)
        self.generator.train(was_training)
        return images.add(1).div(2).clamp(0, 1)

    def _save_samples(self) -> None:
        """The fixed batch's grid: <run dir>/samples/epoch_NNNN.png, and to TensorBoard and W&B
        when they log this run."""
        images = self.sample()
        nrow = math.ceil(math.sqrt(len(images)))
        grid = (
            make_grid(images, nrow=nrow, pad_value=0.5).mul(255).round().to(torch.uint8).cpu()
        )  # 3 x H x W
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(grid, str(folder / f"epoch_{self.current_epoch:04d}.png"))
        log_image(self.loggers, "samples", grid.permute(1, 2, 0).numpy(), self.global_step)

    def configure_optimizers(self):
        optimizers = [
            self.make_optimizer(params=self.discriminator.parameters()),
            self.make_optimizer(params=self.generator.parameters()),
        ]
        if self.make_scheduler is None:
            return optimizers
        steps = total_steps(self.trainer)  # batches: one step of each optimizer a batch
        return optimizers, [self.make_scheduler(o, total_steps=steps) for o in optimizers]
