"""`python -m trainlab.wandb_sweep hparams_search=...`: a W&B sweep definition; `--check FILE`
checks one as the command lines it becomes (trainlab.engine.wandb_sweep)."""

from trainlab.engine.wandb_sweep import main

if __name__ == "__main__":
    main()
