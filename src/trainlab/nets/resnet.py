from pydantic import PositiveInt
from torch import nn
from torchvision.models import ResNet
from torchvision.models import resnet18 as torchvision_resnet18


def resnet18(input_shape: list[PositiveInt], num_classes: PositiveInt) -> ResNet:
    """torchvision's ResNet-18, untrained, with the stem made for 32x32 images.

    The ImageNet stem (7x7 conv with stride 2, then a stride-2 max-pool) would shrink a 32x32
    image to 8x8 before the first block; a 3x3 stride-1 conv and no pool keep all 32x32, so the
    four stages work on 32, 16, 8 and 4 pixels (the usual adaptation to CIFAR). The blocks are
    torchvision's own.
    """
    net = torchvision_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    net.maxpool = nn.Identity()
    return net
