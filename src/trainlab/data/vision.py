"""torchvision's MNIST, Fashion-MNIST and CIFAR-10, downloaded once and then held in memory."""

import pickle

import numpy as np
import torch
from torchvision import datasets

from trainlab.data.images import ImageDataModule
from trainlab.engine import UserError


class TorchvisionDataModule(ImageDataModule):
    """Downloads with torchvision's own code (rank zero only), then keeps the uint8 arrays.

    The official training set is split into train and val; the official test set is the test split.
    """

    dataset_class: type
    files_hint: str  # where the files go, for the message when they are missing

    def __init__(self, *args, download: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.download = download

    def prepare_data(self) -> None:
        for train in (True, False):
            self._open(train, download=self.download)

    def load(self):
        return {
            "train": self._tensors(self._open(train=True)),
            "test": self._tensors(self._open(train=False)),
        }

    def _open(self, train: bool, download: bool = False):
        try:
            return self.dataset_class(str(self.data_dir), train=train, download=download)
        # torchvision reports missing files as RuntimeError, damaged ones as whatever its
        # reader trips on (AssertionError for a bad IDX header, UnpicklingError for CIFAR).
        except (
            RuntimeError,
            OSError,
            AssertionError,
            ValueError,
            TypeError,
            EOFError,
            pickle.UnpicklingError,
        ) as e:
            name = self.dataset_class.__name__
            tried = (
                "could not be downloaded" if download else "download is off (data.download=false)"
            )
            raise UserError(
                f"{name} was not found (or is unreadable) under {self.data_dir} and {tried} "
                f"({' '.join(str(e).split()) or type(e).__name__}). On a machine "
                f"with internet, run once with data.download=true and copy the folder over; or "
                f"place the files yourself: {self.files_hint.format(root=self.data_dir)}. "
                f"paths.data_dir=... points at another data folder."
            ) from None

    @staticmethod
    def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        images = dataset.data
        images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if images.ndim == 3:  # N, H, W grey
            images = images.unsqueeze(1)
        else:  # N, H, W, C colour
            images = images.permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets)


_MNIST_FILES = (
    "{root}/%s/raw/ must hold train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (uncompressed)"
)


class MNISTDataModule(TorchvisionDataModule):
    dataset_class = datasets.MNIST
    files_hint = _MNIST_FILES % "MNIST"
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(TorchvisionDataModule):
    dataset_class = datasets.FashionMNIST
    files_hint = _MNIST_FILES % "FashionMNIST"
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    dataset_class = datasets.CIFAR10
    files_hint = (
        "{root}/cifar-10-batches-py/ must hold data_batch_1 ... data_batch_5, test_batch and "
        "batches.meta, as unpacked from cifar-10-python.tar.gz (or put that archive in {root} and "
        "run with data.download=true)"
    )
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
