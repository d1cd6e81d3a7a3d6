"""`python -m trainlab.compare logs/ [--metric val/f1] [--out DIR]`: rank runs and sweeps,
offline (the leaderboard, plots and HTML page are made in trainlab.engine.compare)."""

from trainlab.engine.compare import main

if __name__ == "__main__":
    main()
