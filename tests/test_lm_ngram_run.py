"""train_lm's n-gram path on real PTB: fit, save, score; the evaluate function and `rnnlab generate`
read the run folder and reproduce the training numbers; bad params name the key."""

import json
import math

import pytest

from rnnlab.cli import generate_command
from rnnlab.config import parse_section
from rnnlab.errors import ConfigError
from rnnlab.evaluate import evaluate_language_model
from rnnlab.lm_train import LMRunConfig, TrainLMConfig, log_samples, train_ngram_model
from rnnlab.training import TrainerConfig


@pytest.fixture(scope="module")
def ngram_run(prepared_ptb, tmp_path_factory):
    out = tmp_path_factory.mktemp("ngram") / "ptb-ngram"
    run = parse_section(LMRunConfig, {"name": "ptb-ngram", "corpus": "ptb", "model": "ngram", "order": 3}, "run")
    row = train_ngram_model(run, prepared_ptb, out)
    return run, out, row


def test_ngram_row_and_files(ngram_run):
    run, out, row = ngram_run
    assert (out / "ngram.npz").is_file() and (out / "vocab.json").is_file()
    assert row["order"] == 3 and row["test_split"] == "test"
    # KN trigram on PTB: far better than uniform (10,000) and than a unigram (~690); worse than KN5 (~141-150).
    assert 140 < row["test_ppl"] < 250
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-4)
    assert row["params"] > 100_000 and row["tokens_per_s"] > 0


def test_evaluate_reproduces_ngram_test_ppl(ngram_run, prepared_ptb):
    _, out, row = ngram_run
    result = evaluate_language_model(out, prepared_ptb, batch_size=10, bptt=35)
    assert result["split"] == "test" and result["tokens"] == 82430 - 1
    assert result["ppl"] == pytest.approx(row["test_ppl"], abs=1e-3)
    assert result["loss"] == pytest.approx(row["test_loss"], abs=1e-5)


def test_generate_from_ngram_folder(ngram_run):
    run, out, _ = ngram_run
    text = generate_command(str(out), "the stock", 20, 1.0, 3)
    assert len(text.split()) >= 15  # 20 tokens, a few may be <eos> line breaks
    assert text == generate_command(str(out), "the stock", 20, 1.0, 3)  # seeded
    assert text != generate_command(str(out), "the stock", 20, 1.0, 4)
    samples = log_samples(run, out, seed=1)
    assert len(samples) == 3 and (out / "samples.txt").read_text().count("prompt=") == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ({"model": "transformer"}, "train_lm.runs[0].model"),
        ({"corpus": "multi30k"}, "train_lm.runs[0].corpus"),
        ({"corpus": "nosuch"}, "train_lm.runs[0].corpus"),
        ({"model": "ngram", "order": 0}, "train_lm.runs[0].order"),
        ({"dropout": -0.1}, "train_lm.runs[0].dropout"),
        ({"bptt": 0}, "train_lm.runs[0].bptt"),
    ],
)
def test_bad_run_params_name_the_key(override, key):
    cfg = TrainLMConfig(trainer=TrainerConfig(), defaults={}, runs=[{"name": "r", "corpus": "ptb", "model": "lstm",
                                                                    **override}])
    with pytest.raises(ConfigError) as err:
        cfg.run_configs()
    assert str(err.value).startswith(key)
    if override.get("model") == "transformer":
        assert "lstm_peephole" in str(err.value) and "ngram" in str(err.value)
    if "corpus" in override:
        assert "tinyshakespeare" in str(err.value) and "wikitext2" in str(err.value)


def test_train_lm_runs_table_with_ngram_and_neural(prepared_ptb, tmp_path):
    from rnnlab.lm_train import parse_train_lm_config, train_lm_runs

    cfg = parse_train_lm_config({
        "trainer": {"progress_bar": False, "checkpoint_every_n_steps": 0},
        "defaults": {"embedding_size": 16, "hidden_size": 16, "num_layers": 1, "dropout": 0.0, "bptt": 20,
                     "batch_size": 16, "train_fraction": 0.02, "limit_train_batches": 10, "samples": 2},
        "runs": [{"name": "ptb-ngram", "corpus": "ptb", "model": "ngram", "order": 2},
                 {"name": "ptb-lstm", "corpus": "ptb", "model": "lstm"}],
    })
    models = tmp_path / "models"
    table = train_lm_runs(cfg, 3, False, prepared_ptb.parent, models, tmp_path / "train_lm.json", tmp_path / "plots",
                          tmp_path / "ckpt")
    assert json.loads((tmp_path / "train_lm.json").read_text()) == table
    assert set(table["ptb"]) == {"ngram", "lstm"}
    for row in table["ptb"].values():
        assert {"val_ppl", "test_ppl", "params", "tokens_per_s", "wall_s", "mlflow_run_id"} <= set(row)
    assert table["ptb"]["ngram"]["test_ppl"] < table["ptb"]["lstm"]["test_ppl"]  # 10 steps of a 16-unit LSTM
    assert (models / "ptb-lstm" / "samples.txt").read_text().count("prompt=") == 2
    neighbours = json.loads((models / "ptb-lstm" / "neighbours.json").read_text())
    assert len(neighbours["money"]) == 8 and all(-1 <= s <= 1 for _, s in neighbours["money"])
    budget = json.loads((models / "budget.json").read_text())
    assert set(budget["runs"]) == {"ptb-ngram", "ptb-lstm"} and budget["wall_s"] > 0
    assert json.loads((tmp_path / "plots" / "ptb-ngram.json").read_text())[0]["val_ppl"] > 1
