import torch

from trainlab.data.images import ImageDataModule
from trainlab.engine import SPLIT_SEED


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1797 8x8 handwritten digits, shipped inside the package: works offline.

    A fixed 20% is held out for test and 10% of the rest for validation.
    """

    mean = (0.3053,)
    std = (0.3759,)

    def load(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # 0..16 intensities onto the 0..255 scale shared by all image data sets
        images = (digits.images * (255 / 16)).round().astype("uint8")[:, None]
        x_train, x_test, y_train, y_test = train_test_split(
            images, digits.target, test_size=0.2, random_state=SPLIT_SEED, stratify=digits.target
        )
        return {
            "train": (torch.from_numpy(x_train), torch.from_numpy(y_train)),
            "test": (torch.from_numpy(x_test), torch.from_numpy(y_test)),
        }
