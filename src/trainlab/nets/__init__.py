"""Networks: plain torch.nn.Modules that know nothing of Lightning, built from config. Configs
name each by its module path (trainlab.nets.cnn.SmallCNN), so a new net is a new module here
and a config file in conf/model/, with nothing to register."""

from trainlab.nets.cnn import SmallCNN
from trainlab.nets.mlp import MLP

__all__ = ["MLP", "SmallCNN"]
