"""train_lm's n-gram path on real PTB: fit, save, score; the evaluate function and `rnnlab generate`
read the run folder and reproduce the training numbers; bad params name the key."""

import json
import math

import pytest
from lm_helpers import lm_params, train_lm_run

from rnnlab.cli import generate_command
from rnnlab.errors import ConfigError
from rnnlab.stages.train import parse_runs, train_stage
from rnnlab.tasks.base import StagePaths
from rnnlab.tasks.lm import score


@pytest.fixture(scope="module")
def ngram_run(prepared_ptb, tmp_path_factory):
    base = tmp_path_factory.mktemp("ngram")
    row = train_lm_run(prepared_ptb, base, "ptb-ngram", seed=1, model="ngram", order=3)
    return base, base / "models" / "ptb-ngram", row


def test_ngram_row_and_files(ngram_run):
    run, out, row = ngram_run
    assert (out / "ngram.npz").is_file() and (out / "vocab.json").is_file()
    assert row["order"] == 3 and row["test_split"] == "test"
    # KN trigram on PTB, measured (counting is deterministic): test 150.874, valid 161.773; far better
    # than uniform (10,000) and a unigram (~690), a little worse than KN5 (141.2 in Mikolov's table).
    assert row["test_ppl"] == pytest.approx(150.874, rel=1e-4) and row["val_ppl"] == pytest.approx(161.773, rel=1e-4)
    assert row["discounts"] == pytest.approx([0.2555, 0.7277, 0.8471], abs=1e-4)  # n1 / (n1 + 2 n2) per order
    for split in ("val", "test"):
        assert row[f"{split}_ppl"] == pytest.approx(math.exp(row[f"{split}_loss"]), rel=1e-4)
    assert row["params"] == 2_320_220 and row["tokens_per_s"] > 0  # stored n-gram counts


def test_evaluate_reproduces_ngram_test_ppl(ngram_run, prepared_ptb):
    _, out, row = ngram_run
    result = score(out, prepared_ptb, batch_size=10, bptt=35)
    assert result["split"] == "test" and result["tokens"] == 82430 - 1
    assert result["ppl"] == pytest.approx(row["test_ppl"], abs=1e-3)
    assert result["loss"] == pytest.approx(row["test_loss"], abs=1e-5)


def test_generate_from_ngram_folder(ngram_run):
    _, out, _ = ngram_run
    text = generate_command(str(out), "the stock", 20, 1.0, 3)
    # Measured (counting and the seeded sampler are deterministic): 20 words after the prompt, no <eos>.
    assert text == (
        "to be identified said the union has an immediate their credit quality and provide needed displays to"
        " improve until a"
    )
    assert text == generate_command(str(out), "the stock", 20, 1.0, 3)  # seeded
    assert text != generate_command(str(out), "the stock", 20, 1.0, 4)
    samples = (out / "samples.txt").read_text()
    assert samples.count("prompt=") == 3 and "seed=1\nthe " in samples  # the run's seed, first prompt "the"


@pytest.mark.parametrize(
    "override, key",
    [
        ({"model": "transformer"}, "train_lm.runs.r.model"),
        ({"corpus": "multi30k"}, "train_lm.runs.r.corpus"),
        ({"corpus": "nosuch"}, "train_lm.runs.r.corpus"),
        ({"model": "ngram", "order": 0}, "train_lm.runs.r.order"),
        ({"dropout": -0.1}, "train_lm.runs.r.dropout"),
        ({"bptt": 0}, "train_lm.runs.r.bptt"),
    ],
)
def test_bad_run_params_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        parse_runs(lm_params({"r": {"corpus": "ptb", "model": "lstm", **override}}), "train_lm")
    assert str(err.value).startswith(key)
    if override.get("model") == "transformer":
        assert "lstm_peephole" in str(err.value) and "ngram" in str(err.value)
    if "corpus" in override:
        assert "tinyshakespeare" in str(err.value) and "wikitext2" in str(err.value)


def test_stage_loop_rows_for_ngram_and_neural(prepared_ptb, tmp_path):
    """Two runs of one section through the stage loop: each writes its own row, plot and model folder."""
    defaults = {
        "embedding_size": 16,
        "hidden_size": 16,
        "num_layers": 1,
        "dropout": 0.0,
        "bptt": 20,
        "batch_size": 16,
        "train_fraction": 0.02,
        "limit_train_batches": 10,
        "samples": 2,
    }
    params = lm_params(
        {"ptb-ngram": {"corpus": "ptb", "model": "ngram", "order": 2}, "ptb-lstm": {"corpus": "ptb", "model": "lstm"}},
        seed=3,
        trainer={"checkpoint_every_n_steps": 0},
        defaults=defaults,
    )
    models = tmp_path / "models"
    rows = {}
    for name in ("ptb-ngram", "ptb-lstm"):
        rows[name] = train_stage(
            params,
            "train_lm",
            name,
            StagePaths(prepared=prepared_ptb.parent),
            models,
            tmp_path / "metrics" / f"{name}.json",
            tmp_path / "plots" / f"{name}.json",
            tmp_path / "ckpt",
        )
        assert json.loads((tmp_path / "metrics" / f"{name}.json").read_text()) == rows[name]
        assert {"val_ppl", "test_ppl", "params", "tokens_per_s", "wall_s", "stage_wall_s", "mlflow_run_id"} <= set(
            rows[name]
        )
        assert not (tmp_path / "ckpt" / "train_lm" / name).exists()  # the resume folder goes once outputs exist
    assert rows["ptb-ngram"]["model"] == "ngram" and rows["ptb-lstm"]["corpus"] == "ptb"
    # Measured: KN bigram 186.794; 10 SGD steps of a 16-unit LSTM 2651.2 (from 10,000 untrained).
    assert rows["ptb-ngram"]["test_ppl"] == pytest.approx(186.794, rel=1e-4)
    assert rows["ptb-lstm"]["test_ppl"] == pytest.approx(2651.2, rel=0.02)
    assert rows["ptb-ngram"]["test_ppl"] < rows["ptb-lstm"]["test_ppl"] < 10_000 / 3
    assert (models / "ptb-lstm" / "samples.txt").read_text().count("prompt=") == 2
    neighbours = json.loads((models / "ptb-lstm" / "neighbours.json").read_text())
    # Recomputed from the saved checkpoint's input embedding: the 8 listed words are the 8 with the
    # highest cosine similarity to "money" (itself excluded), with those similarities.
    import numpy as np
    import torch

    state = torch.load(models / "ptb-lstm" / "model.ckpt", weights_only=True)["state_dict"]
    emb = state["model.embedding.weight"].double().numpy()
    itos = json.loads((models / "ptb-lstm" / "vocab.json").read_text())["itos"]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    money = itos.index("money")
    sims = emb @ emb[money]
    sims[money] = -np.inf
    top = np.argsort(-sims)[:8]
    assert [w for w, _ in neighbours["money"]] == [itos[i] for i in top]
    assert [s for _, s in neighbours["money"]] == pytest.approx(sims[top].tolist(), abs=1e-4)
    curve = json.loads((tmp_path / "plots" / "ptb-ngram.json").read_text())
    assert curve[0]["val_ppl"] == pytest.approx(rows["ptb-ngram"]["val_ppl"], rel=1e-4)


def test_disabled_run_writes_a_row_saying_so(prepared_ptb, tmp_path):
    params = lm_params({"off": {"corpus": "ptb", "model": "lstm", "enabled": False}})
    row = train_stage(
        params,
        "train_lm",
        "off",
        StagePaths(prepared=prepared_ptb.parent),
        tmp_path / "models",
        tmp_path / "off.json",
        tmp_path / "off-plot.json",
        tmp_path / "ckpt",
    )
    assert row["enabled"] is False and "train_lm.runs.off.enabled is false" in row["reason"]
    assert json.loads((tmp_path / "off.json").read_text()) == row
    assert not (tmp_path / "models" / "off" / "model.ckpt").exists()
