"""The project's own callbacks, one module for each kind:

- progress: the progress display (a live bar, or one line per epoch in a log file);
- guards: stop a run safely (a signal, a loss that is no longer a number, ranks out of step);
- checkpoints: what every checkpoint holds, last.ckpt, optimizer changes on resume;
- pruning: a trial of an Optuna sweep reports to its study.

Lightning's standard callbacks and these are all composed from conf/callbacks/.
"""
