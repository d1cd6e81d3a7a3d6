"""`python -m trainlab.wandb_sweep hparams_search=...`: a W&B sweep definition; `--check FILE`
checks one as the command lines it becomes (trainlab.engine.wandb_sweep)."""

from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()  # first of all, before the imports (see trainlab.engine.stopping)

from trainlab.engine.wandb_sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
