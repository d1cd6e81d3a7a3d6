"""The byte-level GPT experiment: its data windows, the net's causality and sampling, and real
runs of `experiment=char_gpt` on tiny texts written here (fast_dev_run, learning, resume, eval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_trainer
from hydra.utils import instantiate

from trainlab.data.text import ConsecutiveWindows, TextDataModule
from trainlab.engine.errors import UserError
from trainlab.eval import evaluate
from trainlab.models.language_model import LanguageModel
from trainlab.nets.gpt import GPT
from trainlab.train import train

PATTERN = "the quick brown fox jumps over the lazy dog. "
# A small net and short windows: a step takes a few milliseconds on one CPU thread.
TINY = [
    "experiment=char_gpt",
    "data.block_size=16",
    "data.batch_size=16",
    "data.batches_per_epoch=10",
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.net.n_embd=32",
    "model.net.dropout=0.0",
    "model.sample.length=30",
]


def write_text(data_dir: Path, text: str, name: str = "input.txt") -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    path.write_text(text, encoding="utf-8")
    return path


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Random bytes: every window of a few bytes occurs once, so a window tells where it is from."""
    return bytes(torch.randint(256, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def text_module(tmp_path: Path, content: bytes, **kwargs) -> TextDataModule:
    (tmp_path / "input.txt").write_bytes(content)
    dm = TextDataModule(str(tmp_path), **kwargs)
    dm.setup("fit")
    return dm


def tiny_gpt(**kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kwargs}).eval()


def epoch_rows(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


# --- data windows ------------------------------------------------------------------------------


def test_train_windows_lie_inside_the_train_split_and_follow_seed_epoch_and_rank(tmp_path):
    dm = text_module(tmp_path, random_bytes(3000), block_size=16, batch_size=32)
    train_split, rest = bytes(dm.splits["train"].tolist()), random_bytes(3000)[2700:]
    assert len(train_split) == 2700 and len(dm.splits["val"]) == len(dm.splits["test"]) == 150

    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 250
    starts = set()
    for x, y in batches[:20]:
        assert x.shape == y.shape == (32, 16) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets: the inputs shifted by one
        for window in torch.cat([x, y[:, -1:]], dim=1):
            window = bytes(window.tolist())
            start = train_split.find(window)
            assert start >= 0 and window not in rest
            starts.add(start)
    assert len(starts) > 400  # spread over the split, not a few places

    def first_batch(epoch: int, rank: int = 0, seed: int = 7) -> torch.Tensor:
        from trainlab.data.text import RandomWindows

        windows = RandomWindows(dm.splits["train"], 16, 4, 1, seed=seed, rank=rank)
        windows.sampler.set_epoch(epoch)  # as Lightning does
        return next(iter(windows))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(0, rank=1))
    assert not torch.equal(first_batch(0), first_batch(0, seed=8))


@pytest.mark.parametrize("n", [1 + 4 * 16, 1 + 4 * 16 + 5, 200])
def test_val_windows_score_every_byte_of_the_split_once(n):
    text = torch.tensor(list(random_bytes(n)), dtype=torch.uint8)
    shares = [ConsecutiveWindows(text, 16, 3, rank=r, world_size=2) for r in range(2)]
    inputs, targets = [], []
    for loader in shares:
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y in batches:
            assert x.shape == y.shape and x.shape[0] <= 3 and torch.equal(x[:, 1:], y[:, :-1])
            inputs += [x.flatten()]
            targets += [y.flatten()]
    # in order, without overlap or gap: the targets are the text but its first byte, and the
    # inputs the text but its last
    assert torch.equal(torch.cat(targets), text[1:].long())
    assert torch.equal(torch.cat(inputs), text[:-1].long())


def test_splits_are_consecutive_parts_of_the_file(tmp_path):
    content = random_bytes(1000)
    dm = text_module(tmp_path, content, block_size=8, val_size=100, test_size=0.2)
    parts = [bytes(dm.splits[s].tolist()) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [700, 100, 200] and b"".join(parts) == content


def test_missing_empty_or_short_text_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"input\.txt does not exist.*data\.path="):
        TextDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(UserError, match="is empty"):
        text_module(tmp_path, b"")
    with pytest.raises(UserError, match="lower data.block_size"):
        text_module(tmp_path, b"x" * 100, block_size=128)
    dm = text_module(tmp_path, b"x" * 100, block_size=8, test_size=0)
    with pytest.raises(UserError, match="test=false"):
        dm.test_dataloader()


# --- the net ----------------------------------------------------------------------------------


def test_attention_is_causal():
    net = tiny_gpt()
    idx = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 256
    with torch.no_grad():
        before, after = net(idx), net(changed)
    assert before.shape == (2, 16, 256)
    assert torch.allclose(before[:, :9], after[:, :9], atol=1e-6)  # earlier positions: unmoved
    assert not torch.allclose(before[:, 9:], after[:, 9:], atol=1e-3)  # later ones see it


def test_output_layer_is_the_token_embedding():
    net = tiny_gpt()
    assert net.head.weight is net.token_embedding.weight
    with pytest.raises(ValueError, match="block_size"):
        net(torch.zeros(1, 17, dtype=torch.long))


def test_generate_with_top_k_1_is_greedy_and_deterministic():
    net = tiny_gpt()
    prompt = torch.tensor([list(b"hello")])

    def sample(seed: int, **kwargs) -> torch.Tensor:
        torch.manual_seed(seed)
        return net.generate(prompt, 40, **kwargs)  # beyond block_size: the context slides

    greedy = sample(1, top_k=1)
    assert greedy.shape == (1, 45) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, sample(2, top_k=1, temperature=0.5))
    idx = prompt
    for _ in range(40):  # the argmax, step by step
        with torch.no_grad():
            next_byte = net(idx[:, -16:])[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_byte], dim=1)
    assert torch.equal(greedy, idx)
    # without the cut, other seeds give other text (the untrained net is nearly uniform)
    assert not torch.equal(sample(1), sample(2))
    # top_k=3 draws only from each step's three most likely bytes
    drawn = sample(3, top_k=3)
    with torch.no_grad():
        logits = torch.stack([net(drawn[:, max(0, t - 16) : t])[0, -1] for t in range(5, 45)])
    top3 = logits.topk(3).indices
    assert (top3 == drawn[0, 5:, None]).any(dim=1).all()


def test_sample_settings_are_checked():
    with pytest.raises(UserError, match="temperature must be > 0"):
        LanguageModel(tiny_gpt(), optimizer=torch.optim.AdamW, sample={"temperature": 0})
    with pytest.raises(UserError, match="unknown keys"):
        LanguageModel(tiny_gpt(), optimizer=torch.optim.AdamW, sample={"legnth": 10})


# --- real runs ----------------------------------------------------------------------------------


def test_fast_dev_run_with_tensorboard(compose, tmp_path):
    write_text(tmp_path / "data", PATTERN * 40)
    cfg = compose(*TINY, "logger=tensorboard", "debug=fdr")
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 1
    assert {"val/loss", "val/bpc", "test/loss", "test/bpc", "train/loss"} <= set(record)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    sample = (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8")
    assert sample.startswith("\n")  # the default prompt


def test_short_run_learns_a_repetitive_text_and_samples_it(compose, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_text(tmp_path / "data", PATTERN * 200)
    cfg = compose(
        *TINY,
        "logger=tensorboard",
        "trainer.max_epochs=4",
        "data.batches_per_epoch=40",
        "optimizer.lr=3e-3",
        "model.sample.prompt=the quick",
        "model.sample.length=60",
        "model.sample.top_k=1",
    )
    run_dir = tmp_path / "run"
    record = train(cfg, run_dir)
    val = epoch_rows(run_dir, "val/loss")
    train_loss = epoch_rows(run_dir, "train/loss_epoch")
    assert len(val) == len(train_loss) == 4
    # ln 256 = 5.5 untrained; the first bytes of each window, with little context, keep it > 0
    assert val[-1] < min(0.6, val[0] / 3) and train_loss[-1] < train_loss[0] / 3
    assert record["val/bpc"] == pytest.approx(record["val/loss"] / 0.6931472, rel=1e-5)
    assert record["best_ckpt"].endswith("best.ckpt") and record["test/loss"] < 0.6
    # the learnt text, continued from the prompt, byte for byte
    sample = (run_dir / "samples.txt").read_text(encoding="utf-8")
    assert len(sample) == len("the quick") + 60
    assert sample == (PATTERN * 3)[: len(sample)]
    # the whole folder: testing after fit may start a second events file
    events = EventAccumulator(str(run_dir / "tensorboard"))
    assert "sample/text_summary" in events.Reload().Tags()["tensors"]


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one_and_eval_agrees(compose, tmp_path):
    write_text(tmp_path / "data", PATTERN * 100)
    # A constant learning rate: a cosine schedule would end with the shorter first run.
    run = [*TINY, "logger=csv", "scheduler=none", "model.net.dropout=0.1", "model.sample.length=0"]
    reference = train(compose(*run, "trainer.max_epochs=2"), tmp_path / "reference")
    train(compose(*run, "trainer.max_epochs=1"), tmp_path / "resumed")
    longer = ("trainer.max_epochs=2", "resume=auto", "resume_allow_changes=true")
    resumed = train(compose(*run, *longer), tmp_path / "resumed")
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 20
    for key in ("train/loss", "val/loss", "test/loss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    assert not (tmp_path / "resumed" / "samples.txt").exists()  # sample.length=0

    best = resumed["best_ckpt"]
    evaluated = evaluate(compose(f"ckpt_path={best}", config="eval"), tmp_path / "eval")
    assert evaluated["test/loss"] == pytest.approx(resumed["test/loss"], abs=1e-6)
    on_val = evaluate(compose(f"ckpt_path={best}", "split=val", config="eval"), tmp_path / "val")
    assert set(on_val) >= {"val/loss", "val/bpc"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["status"] == "finished"


def test_experiment_composes_with_a_file_anywhere(compose, tmp_path):
    path = write_text(tmp_path / "elsewhere", "ünïcödé text " * 50, name="corpus.txt")
    cfg = compose("experiment=char_gpt", f"data.path={path}")
    assert cfg.callbacks.checkpoint.monitor == "val/loss" and cfg.callbacks.checkpoint.mode == "min"
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert sum(len(s) for s in dm.splits.values()) == len(path.read_bytes())
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    assert model.net.block_size == cfg.data.block_size == 128


@pytest.mark.slow
def test_sample_is_logged_to_wandb_as_a_table(compose, tmp_path):
    write_text(tmp_path / "data", PATTERN * 40)
    train(compose(*TINY, "logger=wandb", "trainer.max_epochs=1", "test=false"), tmp_path / "run")
    (table,) = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/sample_*.json")
    rows = json.loads(table.read_text())
    assert rows["columns"] == ["prompt", "text"]
    assert rows["data"][0][1] == (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_cli_on_two_ddp_processes_and_a_missing_file(tmp_path):
    path = write_text(tmp_path / "texts", PATTERN * 40, name="corpus.txt")
    args = [*TINY, "logger=csv", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=1"]
    result = run_cli("trainlab.train", *args, f"data.path={path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["ranks_agree"] and record["steps"] == 10
    assert result.stdout.count("Sample (30 bytes") == 1  # rank zero's alone
    assert (run_dir / "samples.txt").read_text(encoding="utf-8").startswith("\n")

    result = run_cli("trainlab.train", *TINY, "data.path=no/such.txt", cwd=tmp_path)
    assert result.returncode == 2
    assert "no/such.txt does not exist" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_from_lightnings_own_optimisation_resumes_at_its_step(compose, tmp_path):
    # Clipping takes Lightning's automatic optimisation, as every LanguageModel did before the
    # plain step: its checkpoints count their steps where a plain-step run does not look.
    import lightning.pytorch as pl

    write_text(tmp_path / "data", PATTERN * 40)
    cfg = compose(*TINY, "model.sample.length=0")

    def fit(max_steps: int, ckpt_path=None, **clip) -> tuple[pl.Trainer, list[int]]:
        class Steps(pl.Callback):
            def __init__(self):
                self.seen = []

            def on_train_batch_end(self, trainer, *args) -> None:
                self.seen.append(trainer.global_step)

        steps = Steps()
        trainer = tiny_trainer(
            max_epochs=None, max_steps=max_steps, limit_val_batches=0, callbacks=[steps], **clip
        )
        model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=None)
        trainer.fit(model, datamodule=instantiate(cfg.data), ckpt_path=ckpt_path)
        assert model.automatic_optimization == bool(clip)
        return trainer, steps.seen

    first, _ = fit(6, gradient_clip_val=1e12)
    first.save_checkpoint(tmp_path / "auto.ckpt")
    _, seen = fit(10, tmp_path / "auto.ckpt")
    assert seen == [7, 8, 9, 10]  # the four steps left, not ten from step 0
