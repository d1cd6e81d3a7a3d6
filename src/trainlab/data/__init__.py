"""LightningDataModules. Each in-memory data set holds its splits as uint8 image tensors and
normalises whole batches on the training device."""

from trainlab.data.base import InMemoryDataModule
from trainlab.data.digits import DigitsDataModule
from trainlab.data.folder import ImageFolderDataModule
from trainlab.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
]
