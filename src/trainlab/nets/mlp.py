import math
from typing import Annotated

from pydantic import Field, PositiveInt
from torch import nn


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU-Dropout blocks of the given widths, then a linear classifier."""

    def __init__(
        self,
        input_shape: list[PositiveInt],
        num_classes: PositiveInt,
        hidden: list[PositiveInt] = (256, 128),  # [] : a linear classifier
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
