"""The LSTM LM through Lightning on a real PTB slice: learns, is deterministic, and the
evaluate stage's independent loop reproduces the training-time test perplexity."""

import json
import math

import pytest
from lm_helpers import train_lm_run

from rnnlab.tasks.lm import score

TINY = dict(
    model="lstm",
    embedding_size=32,
    hidden_size=32,
    num_layers=1,
    dropout=0.0,
    batch_size=16,
    bptt=20,
    lr=20.0,
    train_fraction=0.05,
    limit_train_batches=60,
    samples=2,
)


@pytest.fixture(scope="module")
def two_runs(prepared_ptb, tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    rows = [train_lm_run(prepared_ptb, base, f"r{i}", seed=7, **TINY) for i in range(2)]
    return base / "models", rows


def test_loss_falls_on_real_ptb(two_runs):
    base, (row, _) = two_runs
    history = json.loads((base / "r0" / "history.json").read_text())
    # Uniform guessing over 10,002 words is ppl 10,002 (loss 9.21); 60 steps must beat it clearly.
    assert row["val_ppl"] < 1500
    assert history[0]["train/loss_epoch"] < math.log(10002) - 1.0


def test_same_seed_same_metrics(two_runs):
    _, (a, b) = two_runs
    keys = ["val_loss", "val_ppl", "test_loss", "test_ppl", "params"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_evaluate_stage_reproduces_training_test_ppl(two_runs, prepared_ptb):
    base, (row, _) = two_runs
    result = score(base / "r0" / "model.ckpt", prepared_ptb, batch_size=10, bptt=20)
    assert result["split"] == "test" and result["tokens"] == 82420
    assert result["ppl"] == pytest.approx(row["test_ppl"], rel=1e-4)


def test_checkpoint_with_other_vocab_is_rejected(two_runs, tmp_path, prepared_ptb):
    import shutil

    from rnnlab.data.vocab import Vocab
    from rnnlab.errors import RnnlabError

    base, _ = two_runs
    other = tmp_path / "prep"
    shutil.copytree(prepared_ptb, other)
    vocab = Vocab.load(other / "vocab.json")
    Vocab(vocab.itos[:-1]).save(other / "vocab.json")
    with pytest.raises(RnnlabError, match=r"vocabulary \(10002 tokens.*does not match the saved vocabulary \(10001"):
        score(base / "r0" / "model.ckpt", other, batch_size=10, bptt=20)


def test_nan_loss_stops_training(prepared_ptb, tmp_path, monkeypatch):
    from rnnlab.errors import TrainingError
    from rnnlab.models.lm import RecurrentLanguageModel

    calls = {"n": 0}
    forward = RecurrentLanguageModel.forward

    def diverging(self, tokens, state=None):
        logits, state = forward(self, tokens, state)
        calls["n"] += 1
        return (logits * float("nan") if calls["n"] >= 5 else logits), state

    monkeypatch.setattr(RecurrentLanguageModel, "forward", diverging)
    with pytest.raises(TrainingError, match=r"train loss is nan at step 4 \(epoch 0\)"):
        train_lm_run(prepared_ptb, tmp_path, "nan", seed=7, **{**TINY, "limit_train_batches": 30})


def test_generate_samples_from_checkpoint_deterministically(two_runs):
    from rnnlab.cli import generate_command
    from rnnlab.data.vocab import Vocab

    base, _ = two_runs
    ckpt = str(base / "r0" / "model.ckpt")
    a = generate_command(ckpt, "the company said", 30, 1.0, seed=3)
    b = generate_command(ckpt, "the company said", 30, 1.0, seed=3)
    c = generate_command(ckpt, "the company said", 30, 1.0, seed=4)
    assert a == b and a != c
    words = a.split()
    vocab = Vocab.load(base / "r0" / "vocab.json")  # the model folder's own copy of the vocabulary
    assert 20 <= len(words) <= 30  # newlines (<eos>) replace some tokens
    assert all(w in vocab.stoi for w in words)
    # A near-zero temperature is close to greedy: the most frequent continuation repeats.
    cold = generate_command(ckpt, "the", 10, 0.01, seed=1)
    assert cold == generate_command(ckpt, "the", 10, 0.01, seed=2)


def test_run_folder_has_samples_and_neighbours(two_runs):
    base, _ = two_runs
    samples = (base / "r0" / "samples.txt").read_text()
    assert samples.count("prompt=") == 2 and "[1] prompt='in the'" in samples
    neighbours = json.loads((base / "r0" / "neighbours.json").read_text())
    assert set(neighbours) <= {"money", "stock", "year", "company", "president", "market", "bank", "japan"}
    assert all(len(v) == 8 and v[0][1] >= v[-1][1] for v in neighbours.values())


def test_generate_cli_reports_bad_run_clearly(tmp_path, capsys):
    from rnnlab.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--run", str(tmp_path / "missing.ckpt"), "--tokens", "5"])
    assert info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
