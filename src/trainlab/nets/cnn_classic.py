import math
from typing import Annotated

from pydantic import Field, PositiveInt
from torch import nn

from trainlab.engine import UserError


class ClassicCNN(nn.Sequential):
    """The classic CNN (model=cnn_classic): a 3x3 conv (same padding), ReLU and 2x2 max-pool
    per entry of `channels`, then the whole last feature map flattened into fc `hidden`, ReLU,
    dropout and the linear classifier.

    Unlike SmallCNN (model=cnn) there is no batch norm and no pooling to a fixed size, so the
    first fc layer grows with the image: 64 x 7 x 7 inputs for 28x28 images, 64 x 8 x 8 for
    32x32.
    """

    def __init__(
        self,
        input_shape: list[PositiveInt],
        num_classes: PositiveInt,
        channels: list[PositiveInt] = (32, 64),
        hidden: PositiveInt = 128,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        c_in, height, width = input_shape
        if min(height, width) < 2 ** len(channels):
            raise UserError(
                f"model.net.channels={list(channels)} pools {height}x{width} images "
                f"{len(channels)} times, halving them each time, which leaves nothing: "
                f"use at most {int(math.log2(min(height, width)))} conv layers for this size."
            )
        layers: list[nn.Module] = []
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
            height, width = height // 2, width // 2
        layers += [
            nn.Flatten(),
            nn.Linear(c_in * height * width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        ]
        super().__init__(*layers)
