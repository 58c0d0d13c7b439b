"""The `study` stage on real PTB with a tiny profile: outputs exist, real values, the RNN's
gradient decays faster with lag than the LSTM's, clipping bounds the update."""

import json

import pytest

from rnnlab.errors import ConfigError
from rnnlab.study.stage import parse_study_config, run_study

TINY = {
    "corpus": "ptb",
    "gradient_flow": {"embedding_size": 32, "hidden_size": 32, "window": 32, "report_lag": 30, "batch_size": 8,
                      "num_windows": 2, "train_steps": 60, "train_batch_size": 16, "bptt": 20},
    "long_lag": {"lags": [2, 20], "steps": 250, "hidden_size": 16},
    "clipping": {"steps": 40, "lr": 2.0, "hidden_size": 32, "batch_size": 16, "bptt": 20},
}


@pytest.fixture(scope="module")
def study(prepared_ptb, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = parse_study_config(TINY)
    metrics = run_study(cfg, 1234, prepared_ptb.parent, out / "plots", out / "pictures", out / "study.json")
    return out, metrics


def test_outputs_are_written(study):
    out, metrics = study
    for name in ("gradient_flow", "long_lag", "clipping"):
        assert json.loads((out / "plots" / f"{name}.json").read_text())
        assert (out / "pictures" / f"{name}.png").stat().st_size > 5000
    assert json.loads((out / "study.json").read_text()) == metrics
    rows = json.loads((out / "plots" / "gradient_flow.json").read_text())
    assert [r["lag"] for r in rows] == list(range(1, 32)) and rows[0]["rnn_trained"] == 1.0


def test_rnn_gradient_decays_faster_than_lstm_on_ptb(study):
    _, metrics = study
    gf = metrics["gradient_flow"]
    for phase in ("init", "trained"):
        rnn, lstm = gf["rnn"][phase]["kept_at_lag_30"], gf["lstm"][phase]["kept_at_lag_30"]
        assert 0 < rnn < lstm
        assert gf["rnn"][phase]["decay_per_step"] < gf["lstm"][phase]["decay_per_step"] <= 1.0
    assert gf["lstm_over_rnn_at_lag_30_trained"] > 100
    assert gf["rnn"]["train_loss_last"] < 9.2  # trained below uniform guessing (ln 10000)


def test_long_lag_and_clipping_numbers(study):
    _, metrics = study
    ll = metrics["long_lag"]["accuracy_at_lag_20"]
    assert 0 <= ll["rnn"] <= 1 and ll["lstm"] > 0.9  # the LSTM recalls through 20 distractors
    clip = metrics["clipping"]
    assert clip["clipped"]["steps_over_clip"] > 0  # the clip was active
    assert clip["unclipped"]["max_grad_norm"] > clip["clip"]


def test_bad_study_params_name_the_key():
    with pytest.raises(ConfigError, match=r"study.gradient_flow.models"):
        parse_study_config({**TINY, "gradient_flow": {"models": ["mlp"]}})
    with pytest.raises(ConfigError, match=r"study.long_lag.models.*valid names"):
        parse_study_config({**TINY, "long_lag": {"models": ["transformer"]}})
    with pytest.raises(ConfigError, match=r"study.gradient_flow.report_lag"):
        parse_study_config({**TINY, "gradient_flow": {"window": 10, "report_lag": 30}})
