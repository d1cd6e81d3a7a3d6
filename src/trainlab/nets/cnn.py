from typing import Annotated

from pydantic import Field, PositiveInt
from torch import nn


class SmallCNN(nn.Sequential):
    """A CNN with batch norm (model=cnn): conv-BN-ReLU blocks, each halving the resolution,
    then a small fully connected head.

    Works on any image size from 8x8 up: the last feature map is pooled to 2x2 (ClassicCNN,
    model=cnn_classic, has no batch norm and flattens the whole map instead).
    """

    def __init__(
        self,
        input_shape: list[PositiveInt],
        num_classes: PositiveInt,
        channels: list[PositiveInt] = (32, 64),
        hidden: PositiveInt = 128,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        layers += [
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c_in * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        ]
        super().__init__(*layers)
