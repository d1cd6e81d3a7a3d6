"""LightningDataModules. An in-memory data set holds each split as one tensor on the training
device and normalises whole batches there (InMemoryDataModule: any features; ImageDataModule:
uint8 images)."""

from trainlab.data.digits import DigitsDataModule
from trainlab.data.folder import ImageFolderDataModule
from trainlab.data.images import ImageDataModule
from trainlab.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from trainlab.engine import InMemoryDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
]
