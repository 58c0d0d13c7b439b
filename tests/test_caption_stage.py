"""The ``features`` and ``train_captioner`` stages on a tiny profile of the real Flickr8k.

``train_captioner`` is the one stage loop (:func:`rnnlab.stages.train.train_stage`, one call per
run, as DVC's ``train_captioner@<run>``) over :mod:`rnnlab.tasks.captioning`.

Captions come from the mirror's real caption file; images are the mirror's (read in place) or,
for the corrupt-image cases, copies of real ones in a temporary folder (one truncated, one
replaced by a text file). MLflow runs go to a temporary sqlite store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rnnlab.cli import main as cli_main
from rnnlab.data.captions import read_flickr8k
from rnnlab.errors import ConfigError, DataError
from rnnlab.io import read_json
from rnnlab.stages.features import features_stage, images_to_encode, parse_features_config
from rnnlab.stages.train import parse_runs, train_stage
from rnnlab.tasks import captioning
from rnnlab.tasks.base import StagePaths

LIMIT = 8  # images per split
TINY_FEATURES = {
    "encoder": "efficientnet_lite0",
    "batch_size": 8,
    "num_workers": 0,
    "on_bad_image": "drop",
    "limit_images": LIMIT,
}
TINY_DEFAULTS = {
    "embedding_size": 16,
    "hidden_size": 32,
    "attention_size": 16,
    "batch_size": 4,
    "max_epochs": 2,
    "min_freq": 1,
    "max_len": 12,
    "lr": 3e-3,
    "beam_sizes": [1, 3],
    "grid_images": 2,
    "eval_batch_size": 8,
}


RUNS = ("flickr8k-show_tell", "flickr8k-soft_attention")


def tiny_params(**features) -> dict:
    return {
        "seed": 7,
        "tracking": {"enabled": True},
        "trainer": {"num_threads": 1},
        "features": {**TINY_FEATURES, **features},
        "train_captioner": {
            "experiment": "rnnlab-captioner-test",
            "defaults": TINY_DEFAULTS,
            "runs": {
                "flickr8k-show_tell": {"decoder": "show_tell"},
                "flickr8k-soft_attention": {"decoder": "soft_attention"},
            },
        },
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mirror) -> Path:
    """prepared/flickr8k/captions.parquet from the real caption file (what ``prepare`` writes)."""
    table, problems = read_flickr8k(mirror / "flickr8k")
    assert any(image == "2258277193_586949ec62.jpg.1" for image, _ in problems)
    out = tmp_path_factory.mktemp("prepared")
    (out / "flickr8k").mkdir()
    table.to_parquet(out / "flickr8k" / "captions.parquet")
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prepared, mirror):
    """Both stages run once on the mirror's images (tracking into a temporary sqlite store)."""
    root = tmp_path_factory.mktemp("stages")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    params = tiny_params()
    feats = features_stage(params, prepared, mirror, root / "features", root / "metrics" / "features.json")
    paths = StagePaths(prepared=prepared, features=root / "features", raw=mirror)
    table = {
        name: train_stage(
            params,
            "train_captioner",
            name,
            paths,
            root / "models",
            root / "metrics" / "train_captioner" / f"{name}.json",
            root / "plots" / "train_captioner" / f"{name}.json",
            root / "checkpoints",
        )
        for name in RUNS
    }
    yield root, feats, table
    mp.undo()


def test_features_stage_encodes_every_limited_image(pipeline):
    root, feats, _ = pipeline
    assert feats["images"] == feats["encoded"] == 3 * LIMIT and feats["bad_images"] == 0
    assert feats["shape"] == [3 * LIMIT, 49, 1280]  # EfficientNet-Lite0: 7x7 grid, 1280 channels
    assert read_json(root / "metrics" / "features.json") == feats
    index = read_json(root / "features" / "features.json")
    assert len(index["names"]) == 3 * LIMIT and index["problems"] == []


def test_train_captioner_stage_writes_models_metrics_and_plots(pipeline):
    root, _, table = pipeline
    assert set(table) == {"flickr8k-show_tell", "flickr8k-soft_attention"}
    for name, row in table.items():
        assert read_json(root / "metrics" / "train_captioner" / f"{name}.json") == row
        assert not (root / "checkpoints" / "train_captioner" / name).exists()  # resume folder cleared
        assert set(row["bleu"]) == {"greedy", "beam3"}
        for scores in row["bleu"].values():
            assert 0.0 <= scores["bleu4"] <= scores["bleu3"] <= scores["bleu2"] <= scores["bleu1"] <= 100.0
        assert row["bleu"]["greedy"]["bleu1"] > 1.0  # tiny, but it learned "a"/"the" and more
        assert row["data"]["test_images"] == LIMIT and row["data"]["train_images"] == LIMIT
        assert row["data"]["captions_without_features"] == 40_000 - 3 * LIMIT * 5
        assert row["epochs"] == 2 and row["wall_seconds"] > 0 and row["captions_per_s"]["beam3"] > 0
        assert len(row["mlflow_run_id"]) == 32
        folder = Path(row["model_path"])
        assert {p.name for p in folder.iterdir()} >= {
            "model.ckpt",
            "vocab.json",
            "run.json",
            "samples.png",
            "metrics.json",
        }
        details = read_json(folder / "metrics.json")
        best = round(min(h["val/loss"] for h in details["history"]), 5)
        assert details["best_val_loss"] == row["best_val_loss"] == best
        assert details["test"]["beam3"]["bleu4"] == row["bleu"]["beam3"]["bleu4"]
    assert (Path(table["flickr8k-soft_attention"]["model_path"]) / "attention.png").stat().st_size > 10_000
    assert not (Path(table["flickr8k-show_tell"]["model_path"]) / "attention.png").exists()
    plot = [r for name in RUNS for r in read_json(root / "plots" / "train_captioner" / f"{name}.json")]
    assert sorted((r["run"], r["beam"]) for r in plot) == [
        ("flickr8k-show_tell", 1),
        ("flickr8k-show_tell", 3),
        ("flickr8k-soft_attention", 1),
        ("flickr8k-soft_attention", 3),
    ]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(table["flickr8k-soft_attention"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["decoder"] == "soft_attention"
    assert run.data.metrics["test.beam3.bleu4"] == table["flickr8k-soft_attention"]["bleu"]["beam3"]["bleu4"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/samples.png", "figures/attention.png"}
    hyps = {a.path for a in client.list_artifacts(run.info.run_id, "hyps")}  # what sacreBLEU scored, line by line
    assert hyps == {"hyps/test_images.txt", "hyps/test_hyps_greedy.txt", "hyps/test_hyps_beam3.txt"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.ckpt"}
    assert run.data.metrics["final/best_val_loss"] == table["flickr8k-soft_attention"]["best_val_loss"]
    assert (
        next(r for r in plot if r["run"] == "flickr8k-soft_attention" and r["beam"] == 3)["sacrebleu"]
        == table["flickr8k-soft_attention"]["sacrebleu"]["beam3"]
    )


def test_score_reproduces_the_training_numbers(pipeline, prepared, mirror):
    root, _, table = pipeline
    paths = StagePaths(prepared=prepared, features=root / "features", raw=mirror)
    for row in table.values():
        again = captioning.score(Path(row["model_path"]), paths, beam_sizes=(1, 3))
        for setting in ("greedy", "beam3"):
            assert {k: again[setting][k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == row["bleu"][setting]
            assert again[setting]["sacrebleu"] == row["sacrebleu"][setting]
        assert again["params"]["decoder"] == row["decoder"]


def test_cli_captions_a_real_image_and_names_a_bad_file(pipeline, mirror, tmp_path, capsys):
    root, _, table = pipeline
    image = mirror / "flickr8k" / "images" / read_json(root / "features" / "features.json")["names"][0]
    cli_main(["caption", str(image), "--beam", "3", "--run", table["flickr8k-soft_attention"]["model_path"]])
    caption = capsys.readouterr().out.strip()
    # The task's own entry point (CLI and serving) gives the same caption.
    assert captioning.caption_images(table["flickr8k-soft_attention"]["model_path"], [image], beam_size=3) == [caption]
    assert caption and len(caption.split()) <= TINY_DEFAULTS["max_len"] + 1  # decoding stops after max_len + 1 steps
    # An MLflow run id resolves to the run's model artifact: same model, same caption.
    cli_main(["caption", str(image), "--beam", "3", "--run", table["flickr8k-soft_attention"]["mlflow_run_id"]])
    assert capsys.readouterr().out.strip() == caption
    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a picture\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        cli_main(["caption", str(bad), "--run", table["flickr8k-soft_attention"]["model_path"]])
    assert exc.value.code == 2
    assert f"{bad}: not an image" in capsys.readouterr().err


@pytest.fixture()
def corrupt_raw(tmp_path, prepared, mirror) -> tuple[Path, str, str]:
    """raw/flickr8k/images with copies of the tiny profile's real images; one truncated, one text."""
    import pandas as pd

    names = images_to_encode(pd.read_parquet(prepared / "flickr8k" / "captions.parquet"), LIMIT)
    images = tmp_path / "raw" / "flickr8k" / "images"
    images.mkdir(parents=True)
    for name in names:
        shutil.copyfile(mirror / "flickr8k" / "images" / name, images / name)
    truncated, text = names[1], names[-2]
    data = (images / truncated).read_bytes()
    (images / truncated).write_bytes(data[: len(data) // 3])
    (images / text).write_text("Flickr8k caption list, not an image\n", encoding="utf-8")
    return tmp_path / "raw", truncated, text


def test_bad_images_are_reported_counted_and_dropped(corrupt_raw, prepared, tmp_path):
    raw, truncated, text = corrupt_raw
    metrics = features_stage(tiny_params(), prepared, raw, tmp_path / "features", tmp_path / "features.json")
    assert metrics["bad_images"] == 2 and metrics["encoded"] == 3 * LIMIT - 2
    reasons = {p["image"]: p["reason"] for p in metrics["bad_image_names"]}
    assert reasons == {truncated: "truncated or incomplete image", text: "not an image (unrecognised format)"}
    assert metrics["captions_of_bad_images"] == 10  # 5 captions each, counted, not silently lost
    assert read_json(tmp_path / "features.json")["captions_of_bad_images"] == 10
    assert truncated not in read_json(tmp_path / "features" / "features.json")["names"]


def test_bad_images_fail_the_stage_when_asked(corrupt_raw, prepared, tmp_path):
    raw, truncated, text = corrupt_raw
    with pytest.raises(DataError) as exc:
        features_stage(
            tiny_params(on_bad_image="fail"), prepared, raw, tmp_path / "features", tmp_path / "features.json"
        )
    assert truncated in str(exc.value) and text in str(exc.value) and "on_bad_image" in str(exc.value)
    assert not (tmp_path / "features" / "features.npy").exists()
    assert read_json(tmp_path / "features.json")["bad_images"] == 2


def test_caption_runs_config_names_bad_keys():
    from rnnlab.stages.common import training_section

    params = tiny_params()
    assert training_section(params, "train_captioner", captioning.EXPERIMENT).experiment == "rnnlab-captioner-test"
    runs = parse_runs(params, "train_captioner")
    assert [r.decoder for r in runs.values()] == ["show_tell", "soft_attention"]
    assert runs["flickr8k-show_tell"].hidden_size == TINY_DEFAULTS["hidden_size"]  # defaults under every run
    params["train_captioner"]["runs"]["flickr8k-soft_attention"]["foo"] = 1
    with pytest.raises(ConfigError, match=r"train_captioner\.runs\.flickr8k-soft_attention\.foo: unknown key"):
        parse_runs(params, "train_captioner")
    params = tiny_params()
    # A bad default is named under the first run it reaches (runs are checked merged with defaults).
    params["train_captioner"]["defaults"] = {**TINY_DEFAULTS, "hidden_size": 0}
    with pytest.raises(ConfigError, match=r"train_captioner\.runs\.flickr8k-show_tell\.hidden_size"):
        parse_runs(params, "train_captioner")
    params = tiny_params()
    params["train_captioner"]["defaults"] = {**TINY_DEFAULTS, "num_threads": 1}  # now trainer.num_threads
    with pytest.raises(ConfigError, match=r"train_captioner\.runs\.flickr8k-show_tell\.num_threads: unknown key"):
        parse_runs(params, "train_captioner")
    with pytest.raises(ConfigError, match=r"features\.on_bad_image"):
        features_stage(tiny_params(on_bad_image="skip"), Path("nowhere"), Path("nowhere"), Path("x"), Path("y"))


def test_repository_params_sections_are_valid():
    from rnnlab.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert parse_features_config(params).on_bad_image == "drop"
    runs = parse_runs(params, "train_captioner")
    assert [cfg.decoder for cfg in runs.values()] == ["show_tell", "soft_attention"]
    assert sorted(cfg.beam_sizes for cfg in runs.values()) == [[1, 3, 5], [1, 3, 5]]
