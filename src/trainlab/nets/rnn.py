from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from trainlab.engine import UserError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RowRNN(nn.Module):
    """A recurrent classifier that reads an image row by row: a [C, H, W] image is H steps of
    C x W features (8 steps of 8 for the digits, 28 of 28 for MNIST). It classifies from the
    last layer's final hidden state, of both directions when `bidirectional`.
    """

    def __init__(
        self,
        input_shape: list[PositiveInt],
        num_classes: PositiveInt,
        cell: Literal["lstm", "gru"] = "lstm",
        hidden: PositiveInt = 128,
        layers: PositiveInt = 1,
        bidirectional: bool = False,
    ):
        super().__init__()
        if cell not in CELLS:
            raise UserError(
                f"model.net.cell={cell!r} is not a recurrent cell this net knows: "
                f"choose {' or '.join(CELLS)}."
            )
        channels, _, width = input_shape
        self.directions = 2 if bidirectional else 1
        self.rnn = CELLS[cell](
            channels * width,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
        )
        self.head = nn.Linear(hidden * self.directions, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # row t holds every channel's row t
        _, state = self.rnn(rows)
        h_n = state[0] if isinstance(state, tuple) else state  # an LSTM also returns its cell
        # h_n is [layers x directions, N, hidden], the last layer's directions last
        last = h_n[-self.directions :].transpose(0, 1).reshape(n, -1)
        return self.head(last)
