"""The `study` stage on real PTB with a tiny profile: outputs exist, real values, the RNN's
gradient decays faster with lag than the LSTM's, clipping bounds the update."""

import json

import pytest

from rnnlab.errors import ConfigError
from rnnlab.study.stage import parse_study_config, run_study

TINY = {
    "corpus": "ptb",
    "gradient_flow": {
        "embedding_size": 32,
        "hidden_size": 32,
        "window": 32,
        "report_lag": 30,
        "batch_size": 8,
        "num_windows": 2,
        "train_steps": 60,
        "train_batch_size": 16,
        "bptt": 20,
    },
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
    # 60 Adam steps: both models from ln 10000 = 9.21 to 6.70 (measured 6.7053 RNN, 6.7007 LSTM).
    assert gf["rnn"]["train_loss_last"] == pytest.approx(6.705, abs=0.05)
    assert gf["lstm"]["train_loss_last"] == pytest.approx(6.701, abs=0.05)


def test_long_lag_and_clipping_numbers(study):
    out, metrics = study
    ll = metrics["long_lag"]["accuracy_at_lag_20"]
    chance = metrics["long_lag"]["chance"]
    assert chance == 0.25  # 4 symbols to recall
    # Measured: at lag 2 both recall every sequence; at lag 20 the RNN is at chance (0.221) and the
    # LSTM still recalls every one through 20 distractors.
    rows = {r["lag"]: r for r in json.loads((out / "plots" / "long_lag.json").read_text())}
    assert (rows[2]["rnn"], rows[2]["lstm"]) == (1.0, 1.0)
    assert rows[20]["rnn"] == ll["rnn"] == pytest.approx(0.221, abs=0.03)
    assert abs(ll["rnn"] - chance) < 0.1 and rows[20]["lstm"] == ll["lstm"] == 1.0
    clip = metrics["clipping"]
    assert clip["clipped"]["steps_over_clip"] > 0  # the clip was active
    assert clip["unclipped"]["max_grad_norm"] > clip["clip"]
    # Same initial weights and batches: the two runs are identical up to the first step whose
    # gradient norm exceeds the clip (clipping leaves smaller gradients alone), and differ after it.
    steps = json.loads((out / "plots" / "clipping.json").read_text())
    first = next(i for i, r in enumerate(steps) if r["grad_norm_unclipped"] > clip["clip"])
    assert 0 < first < len(steps) - 1
    for r in steps[: first + 1]:
        assert r["grad_norm_clipped"] == pytest.approx(r["grad_norm_unclipped"], rel=1e-6)
        assert r["loss_clipped"] == pytest.approx(r["loss_unclipped"], rel=1e-6)
    assert steps[first + 1]["grad_norm_clipped"] != pytest.approx(steps[first + 1]["grad_norm_unclipped"], rel=1e-4)
    # measured: max pre-clip norm 0.699 clipped vs 1.103 unclipped
    assert clip["clipped"]["max_grad_norm"] == pytest.approx(0.699, abs=0.01)
    assert clip["unclipped"]["max_grad_norm"] == pytest.approx(1.103, abs=0.01)


def test_bad_study_params_name_the_key():
    with pytest.raises(ConfigError, match=r"study.gradient_flow.models"):
        parse_study_config({**TINY, "gradient_flow": {"models": ["mlp"]}})
    with pytest.raises(ConfigError, match=r"study.long_lag.models.*valid names"):
        parse_study_config({**TINY, "long_lag": {"models": ["transformer"]}})
    with pytest.raises(ConfigError, match=r"study.gradient_flow.report_lag"):
        parse_study_config({**TINY, "gradient_flow": {"window": 10, "report_lag": 30}})
