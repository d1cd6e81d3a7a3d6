"""Hydra plugins of trainlab: a launcher that runs each sweep job in its own process, and an
Optuna sweeper on current Optuna. Hydra finds them here, in the `hydra_plugins` namespace."""
