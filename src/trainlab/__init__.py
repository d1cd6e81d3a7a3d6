"""trainlab: a PyTorch Lightning + Hydra research template.

Importing the package is cheap on purpose: torch and lightning load only when a run starts,
so `--help` and config errors answer at once.
"""

__version__ = "0.1.0"
