import math

from torch import nn


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU-Dropout blocks of the given widths, then a linear classifier."""

    def __init__(
        self,
        input_shape: list[int],
        num_classes: int,
        hidden: list[int] = (256, 128),
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
