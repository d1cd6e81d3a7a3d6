"""data=wine and experiment=wine_mlp: the non-image example of README's "Making it yours"."""

from trainlab.train import train


def test_wine_mlp_tells_the_three_cultivars_apart(compose, tmp_path):
    record = train(compose("experiment=wine_mlp", "logger=csv"), tmp_path / "run")
    assert record["status"] == "finished"
    assert record["test/acc"] >= 0.9  # 36 test wines; chance is 1/3
