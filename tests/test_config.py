from pathlib import Path

import pytest
import yaml

from rnnlab.config import load_params, parse_section
from rnnlab.errors import ConfigError
from rnnlab.stages.download import DownloadConfig
from rnnlab.stages.train import parse_runs
from rnnlab.training import TrainerConfig

REPO = Path(__file__).resolve().parents[1]


def _lm(**run):
    return {"seed": 1, "train_lm": {"defaults": {}, "runs": {"r": {"corpus": "ptb", "model": "lstm", **run}}}}


@pytest.mark.parametrize(
    "run, message",
    [
        ({"bptt": 0}, r"train_lm.runs.r.bptt: expected an integer >= 1, got 0"),
        ({"dropout": -0.1}, r"train_lm.runs.r.dropout: expected a number in \[0, 1\), got -0.1"),
        ({"hidden_size": "big"}, r"train_lm.runs.r.hidden_size: expected an integer, got 'big'"),
        ({"hiden_size": 3}, r"train_lm.runs.r.hiden_size: unknown key"),
        ({"model": "transformer"}, r"unknown model 'transformer'; valid names: \[.*'lstm'"),
        ({"optimizer": "rmsprop"}, r"optimizer: expected one of \['sgd', 'adam', 'adamw'\]"),
        ({"name": "x"}, r"train_lm.runs.r.name: a run is named by its key"),
    ],
)
def test_bad_train_lm_params_name_the_key(run, message):
    with pytest.raises(ConfigError, match=message):
        parse_runs(_lm(**run), "train_lm")


def test_missing_and_ill_typed_keys():
    with pytest.raises(ConfigError, match=r"train_lm.runs.r.corpus: missing"):
        parse_runs({"train_lm": {"runs": {"r": {"model": "lstm"}}}}, "train_lm")
    with pytest.raises(ConfigError, match=r"train_lm.runs: expected a mapping of run name"):
        parse_runs({"train_lm": {"runs": [{"name": "r", "corpus": "ptb", "model": "lstm"}]}}, "train_lm")
    with pytest.raises(ConfigError, match=r"train_lm.trainer.precision: expected one of"):
        parse_runs({**_lm(), "train_lm": {**_lm()["train_lm"], "trainer": {"precision": "8-bit"}}}, "train_lm")
    with pytest.raises(ConfigError, match=r"download.retries: expected an integer, got '3'"):
        parse_section(DownloadConfig, {"corpora": ["ptb"], "retries": "3"}, "download")
    with pytest.raises(ConfigError, match=r"trainer.precision: expected one of"):
        parse_section(TrainerConfig, {"precision": "8-bit"}, "trainer")


def test_params_file_missing_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: params file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping, got list"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: missing section 'train_lm'"):
        parse_runs(load_params(tmp_path / "params.yaml"), "train_lm")


def _profile_copy(tmp_path, profile: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = profile
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "profiles").mkdir(exist_ok=True)
    for p in (REPO / "profiles").glob("*.yaml"):
        (tmp_path / "profiles" / p.name).write_text(p.read_text())
    return tmp_path / "params.yaml"


def test_profiles_are_selected_by_one_key(tmp_path):
    cpu = load_params(REPO / "params.yaml")
    full = load_params(_profile_copy(tmp_path, "full"))
    tiny = load_params(_profile_copy(tmp_path, "tiny"))
    assert cpu["profile"] == "cpu" and full["profile"] == "full" and tiny["profile"] == "tiny"
    # cpu is params.yaml itself; the others change values of the same runs
    assert cpu["train_lm"]["runs"]["ptb-lstm"]["bptt"] == 20
    assert full["train_lm"]["runs"]["ptb-lstm"]["bptt"] == 35 and full["train_lm"]["defaults"]["hidden_size"] == 650
    assert full["train_seq2seq"]["defaults"]["hidden_size"] == 512
    assert set(full["train_lm"]["runs"]) == set(cpu["train_lm"]["runs"]) == set(tiny["train_lm"]["runs"])
    enabled = [n for n, r in parse_runs(tiny, "train_lm").items() if r.enabled]
    assert enabled == ["ptb-ngram", "ptb-lstm"]
    assert tiny["trainer"]["num_threads"] == 1 and cpu["trainer"]["num_threads"] == 0


def test_profile_errors_name_the_file_and_key(tmp_path):
    path = _profile_copy(tmp_path, "gpu")
    with pytest.raises(
        ConfigError,
        match=r"profile: 'gpu' has no file .*profiles/gpu.yaml; known profiles: "
        r"\['cpu', 'full', 'tiny'\]",
    ):
        load_params(path)
    path = _profile_copy(tmp_path, "tiny")
    (tmp_path / "profiles" / "tiny.yaml").write_text("train_lm:\n  runs:\n    ptb-new: {corpus: ptb, model: gru}\n")
    with pytest.raises(ConfigError, match=r"tiny.yaml: train_lm: runs.ptb-new: a profile can only change runs"):
        load_params(path)


@pytest.mark.parametrize("profile", ["cpu", "full", "tiny"])
def test_repository_params_file_is_valid(profile, tmp_path):
    """The shipped params.yaml parses with every stage's schema, in every profile."""
    from rnnlab.data.corpora import load_corpora
    from rnnlab.data.prepare import parse_prepare_config
    from rnnlab.stages.evaluate import parse_evaluate_config
    from rnnlab.stages.features import parse_features_config
    from rnnlab.study.stage import parse_study_config

    params = load_params(_profile_copy(tmp_path, profile))
    parse_section(DownloadConfig, params["download"], "download")
    parse_prepare_config(params["prepare"])
    corpora = load_corpora(params)
    assert sorted(corpora) == ["flickr8k", "multi30k", "ptb", "tinyshakespeare", "wikitext2"]
    assert corpora["ptb"].options.max_size == (2000 if profile == "tiny" else None)  # a profile's options
    parse_evaluate_config(params)
    parse_study_config(params["study"])
    parse_features_config(params)
    assert len(parse_runs(params, "train_lm")) == 10
    assert len(parse_runs(params, "train_seq2seq")) == 2
    assert len(parse_runs(params, "train_captioner")) == 2
