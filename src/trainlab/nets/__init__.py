"""Networks: plain torch.nn.Modules that know nothing of Lightning, built from config."""

from trainlab.nets.cnn import SmallCNN
from trainlab.nets.mlp import MLP

__all__ = ["MLP", "SmallCNN"]
