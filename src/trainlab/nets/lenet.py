from pydantic import PositiveInt
from torch import nn

from trainlab.engine import UserError


class LeNet5(nn.Sequential):
    """LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, the classifier.

    Made for 32x32 grey images (16 maps of 5x5 reach the first fc layer); other sizes work too,
    the first fc layer taking whatever the convolutions leave. ReLU and max-pooling stand in for
    the original's scaled tanh and trainable subsampling: they train faster and just as well.
    """

    def __init__(self, input_shape: list[PositiveInt], num_classes: PositiveInt):
        channels, height, width = input_shape
        if min(height, width) < 16:
            raise UserError(
                f"LeNet-5 needs images of at least 16x16 (its two 5x5 convolutions and two "
                f"poolings leave nothing of {height}x{width}): set data.input_shape to "
                f"[{channels},32,32], the size it was made for; the images are resized to it."
            )
        for _ in range(2):  # a 5x5 convolution without padding, then a 2x2 pooling
            height, width = (height - 4) // 2, (width - 4) // 2
        super().__init__(
            nn.Conv2d(channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * height * width, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
