import pytest

from rnnlab.config import load_params, parse_section
from rnnlab.errors import ConfigError
from rnnlab.lm_train import parse_train_lm_config
from rnnlab.stages import DownloadConfig
from rnnlab.training import TrainerConfig

BASE = {"trainer": {}, "defaults": {}, "runs": [{"name": "r", "corpus": "ptb", "model": "lstm"}]}


def _with(**run):
    return {**BASE, "runs": [{"name": "r", "corpus": "ptb", "model": "lstm", **run}]}


@pytest.mark.parametrize(
    "run, message",
    [
        ({"bptt": 0}, r"train_lm.runs\[0\].bptt: expected an integer >= 1, got 0"),
        ({"dropout": -0.1}, r"train_lm.runs\[0\].dropout: expected a number in \[0, 1\), got -0.1"),
        ({"hidden_size": "big"}, r"train_lm.runs\[0\].hidden_size: expected an integer, got 'big'"),
        ({"hiden_size": 3}, r"train_lm.runs\[0\].hiden_size: unknown key"),
        ({"model": "transformer"}, r"unknown model 'transformer'; valid names: \[.*'lstm'"),
        ({"corpus": "multi30k"}, r"'multi30k' is not a language-modelling corpus"),
        ({"optimizer": "rmsprop"}, r"optimizer: expected one of \['sgd', 'adam', 'adamw'\]"),
    ],
)
def test_bad_train_lm_params_name_the_key(run, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_lm_config(_with(**run))


def test_missing_and_ill_typed_keys():
    with pytest.raises(ConfigError, match=r"train_lm.runs\[0\].corpus: missing"):
        parse_train_lm_config({**BASE, "runs": [{"name": "r", "model": "lstm"}]})
    with pytest.raises(ConfigError, match=r"download.retries: expected an integer, got '3'"):
        parse_section(DownloadConfig, {"corpora": ["ptb"], "retries": "3"}, "download")
    with pytest.raises(ConfigError, match=r"trainer.precision: expected one of"):
        parse_section(TrainerConfig, {"precision": "8-bit"}, "trainer")


def test_repository_params_file_is_valid():
    """The shipped params.yaml parses with every stage's schema."""
    from pathlib import Path

    from rnnlab.data.prepare import parse_prepare_config
    from rnnlab.evaluate_stage import EvaluateConfig

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    parse_section(DownloadConfig, params["download"], "download")
    parse_prepare_config(params["prepare"])
    assert parse_train_lm_config(params["train_lm"]).run_configs()
    parse_section(EvaluateConfig, params["evaluate"], "evaluate")
    from rnnlab.caption_stage import parse_caption_runs, parse_features_config
    from rnnlab.seq2seq_stage import parse_train_seq2seq_config
    from rnnlab.study.stage import parse_study_config

    parse_study_config(params["study"])
    assert len(parse_train_seq2seq_config(params["train_seq2seq"]).runs) == 2
    parse_features_config(params)
    assert len(parse_caption_runs(params)[1]) == 2
