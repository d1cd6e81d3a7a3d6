"""DCGAN's generator and discriminator (Radford et al., 2016), sized for small images.

Both work at a quarter of the image's height and width and get there in two stride-2 steps,
so the image's sides must be multiples of 4 (28x28 MNIST and 8x8 digits are).
"""

from pydantic import PositiveInt
from torch import nn

from trainlab.engine import UserError


def _quarter(input_shape: list[int]) -> tuple[int, int, int]:
    """(channels, H/4, W/4) of a (C, H, W) image, or a UserError if H or W is no multiple of 4."""
    channels, height, width = input_shape
    if height % 4 or width % 4:
        raise UserError(
            f"the DCGAN nets need an image height and width divisible by 4, but "
            f"data.input_shape is {list(input_shape)}: resize the images (e.g. to 28x28 or "
            "32x32) or use a data set whose images already are."
        )
    return channels, height // 4, width // 4


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: weights from N(0, 0.02), batch-norm scales from N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Sequential):
    """z (N x latent_dim) -> linear -> width x H/4 x W/4 -> two transposed-conv doublings
    (batch norm and ReLU between) -> tanh: N x C x H x W images in [-1, 1]."""

    def __init__(
        self, input_shape: list[PositiveInt], latent_dim: PositiveInt, width: PositiveInt = 128
    ):
        channels, h, w = _quarter(input_shape)
        super().__init__(
            nn.Linear(latent_dim, width * h * w, bias=False),
            nn.Unflatten(1, (width, h, w)),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width // 2, channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )
        self.latent_dim = latent_dim
        self.apply(dcgan_init)


class Discriminator(nn.Sequential):
    """N x C x H x W images -> two stride-2 convs with leaky ReLU (batch norm on the second,
    none on the input layer, as in DCGAN) -> one logit per image, shape (N,)."""

    def __init__(self, input_shape: list[PositiveInt], width: PositiveInt = 64):
        channels, h, w = _quarter(input_shape)
        super().__init__(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width * 2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(width * 2 * h * w, 1),
            nn.Flatten(0),
        )
        self.apply(dcgan_init)
