"""`python -m trainlab.compare logs/ [--metric val/f1] [--out DIR]`: rank runs and sweeps,
offline (the leaderboard, plots and HTML page are made in trainlab.engine.compare)."""

from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()  # first of all, before the imports (see trainlab.engine.stopping)

from trainlab.engine.compare import main  # noqa: E402

if __name__ == "__main__":
    main()
