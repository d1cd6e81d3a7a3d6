import torch

from trainlab.engine import SPLIT_SEED, InMemoryDataModule


class WineDataModule(InMemoryDataModule):
    """scikit-learn's wine recognition data, shipped inside the package: 178 wines, 13 chemical
    measurements each, 3 cultivars. A fixed 20% is held out for test."""

    def load(self):
        from sklearn.datasets import load_wine
        from sklearn.model_selection import train_test_split

        x, y = load_wine(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y
        )
        return {
            "train": (torch.from_numpy(x_train), torch.from_numpy(y_train)),
            "test": (torch.from_numpy(x_test), torch.from_numpy(y_test)),
        }
