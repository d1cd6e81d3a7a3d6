"""Hydra plugins of trainlab: a launcher that runs each sweep job in its own process, an Optuna
sweeper on current Optuna, and a config source that parses each config file once per process.
Hydra finds them here, in the `hydra_plugins` namespace."""
