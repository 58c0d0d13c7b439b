"""Corpora declared in params.yaml (issue 13): every bad input is a clear error before training,
and a new corpus (real text, declared only in a temporary params.yaml) runs end to end."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from rnnlab.config import load_params
from rnnlab.data.corpora import parse_corpora, repo_corpora
from rnnlab.data.download import fetch_corpus
from rnnlab.data.prepare import parse_prepare_config, prepare_corpora
from rnnlab.errors import ConfigError, DataError, DownloadError
from rnnlab.stages.download import download_stage


def book_entry(**extra) -> dict:
    return {
        "task": "lm-word",
        "files": {"book.txt": {"path": "book.txt"}},
        "carve": {"file": "book.txt", "by": "lines", "valid": 0.1, "test": 0.1},
        "options": {"tokenizer": "word", "lowercase": True},
        **extra,
    }


def ptb_slice(dst: Path, mirror: Path, lines: int, start: int = 0) -> Path:
    text = (mirror / "ptb" / "ptb.train.txt").read_text().splitlines(keepends=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(text[start : start + lines]))
    return dst


def prepare(spec_data: dict, repo: Path, name: str = "mine") -> dict:
    specs = parse_corpora({name: spec_data})
    fetch_corpus(specs[name], repo / "raw", None, progress=False, repo_root=repo)
    return prepare_corpora(parse_prepare_config({"corpora": [name]}), repo / "raw", repo / "prepared", specs)


# ------------------------------------------------------------------ bad input, each named


def test_unknown_task_names_the_key():
    with pytest.raises(ConfigError, match=r"corpora.mine.task: expected one of \['lm-word', 'lm-char', 'parallel'"):
        parse_corpora({"mine": book_entry(task="lm-words")})


def test_url_without_checksum_names_the_key():
    entry = book_entry(files={"book.txt": {"url": "https://example.invalid/book.txt"}})
    with pytest.raises(ConfigError, match=r"corpora.mine.files.book.txt.sha256: missing; a file from a URL needs"):
        parse_corpora({"mine": entry})


def test_split_naming_an_undeclared_file_names_the_key():
    entry = book_entry(carve=None, splits={"train": "book.txt", "valid": "other.txt"})
    with pytest.raises(ConfigError, match=r"corpora.mine.splits.valid: 'other.txt' is not one of this corpus's files"):
        parse_corpora({"mine": entry})


def test_missing_local_file_names_key_and_path(tmp_path):
    with pytest.raises(DownloadError, match=r"corpora.mine.files.book.txt.path: .*book.txt: file not found"):
        prepare(book_entry(), tmp_path)


def test_changed_local_file_shows_expected_and_found_checksums(tmp_path, mirror):
    book = ptb_slice(tmp_path / "book.txt", mirror, 200)
    params = {
        "corpora": {"mine": book_entry()},
        "download": {"corpora": ["mine"], "mirror": None, "progress": False},
    }
    lock = tmp_path / "corpora.lock.json"
    download_stage(params, tmp_path / "raw", tmp_path / "d.json", lock, repo_root=tmp_path)
    recorded = json.loads(lock.read_text())["mine"]["book.txt"]
    assert recorded == hashlib.sha256(book.read_bytes()).hexdigest()
    download_stage(params, tmp_path / "raw", tmp_path / "d.json", lock, repo_root=tmp_path)  # unchanged: fine
    with book.open("a") as fh:
        fh.write("one more line\n")
    found = hashlib.sha256(book.read_bytes()).hexdigest()
    with pytest.raises(DownloadError) as info:
        download_stage(params, tmp_path / "raw", tmp_path / "d.json", lock, repo_root=tmp_path)
    msg = str(info.value)
    assert f"expected sha256 {recorded} (recorded in data/corpora.lock.json), found {found}" in msg
    assert msg.startswith("corpora.mine.files.book.txt:")
    # a declared sha256 is checked the same way
    params["corpora"]["mine"]["files"]["book.txt"]["sha256"] = "0" * 64
    with pytest.raises(DownloadError, match=rf"expected sha256 {'0' * 64} \(recorded in params.yaml\), found {found}"):
        download_stage(params, tmp_path / "raw", tmp_path / "d.json", None, repo_root=tmp_path)


def test_misaligned_parallel_files_give_both_counts(tmp_path, mirror):
    with gzip.open(mirror / "multi30k" / "raw" / "train.en.gz", "rt") as fh:
        en = [next(fh) for _ in range(50)]
    with gzip.open(mirror / "multi30k" / "raw" / "train.de.gz", "rt") as fh:
        de = [next(fh) for _ in range(49)]
    (tmp_path / "a.en").write_text("".join(en))
    (tmp_path / "a.de").write_text("".join(de))
    entry = {
        "task": "parallel",
        "files": {"a.en": {"path": "a.en"}, "a.de": {"path": "a.de"}},
        "carve": {"file": {"src": "a.en", "tgt": "a.de"}, "by": "every_nth", "every": 10},
        "options": {"tokenizer": "word", "lowercase": True, "src_lang": "en", "tgt_lang": "de"},
    }
    with pytest.raises(DataError, match=r"misaligned parallel corpus: .*a.en has 50 lines but .*a.de has 49"):
        prepare(entry, tmp_path)


def test_carve_rule_that_leaves_a_split_empty(tmp_path, mirror):
    ptb_slice(tmp_path / "book.txt", mirror, 5)
    entry = book_entry(carve={"file": "book.txt", "by": "lines", "valid": 0.1, "test": 0.1})
    with pytest.raises(DataError, match=r"corpora.mine.carve: the rule \(by lines, valid 0.1, test 0.1\) leaves split"):
        prepare(entry, tmp_path)


def test_image_folder_without_a_decodable_image(tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        (tmp_path / "photos" / name).write_bytes(b"not an image")
    (tmp_path / "caps.tsv").write_text("".join(f"{n}\ta dog runs on the grass\n" for n in ("a.jpg", "b.png", "c.jpg")))
    entry = {
        "task": "captions",
        "files": {"caps.tsv": {"path": "caps.tsv"}, "photos/": {"path": "photos/"}},
        "captions": {"format": "tsv", "file": "caps.tsv", "images": "photos"},
        "carve": {"file": "caps.tsv", "by": "every_nth", "every": 3},
    }
    with pytest.raises(DataError, match=r"corpora.mine.captions.images: .*photos: no decodable image among the 3"):
        prepare(entry, tmp_path)


def test_name_colliding_with_a_built_in_is_an_error(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    assert "\ncorpora:\n  ptb:\n" in text
    shutil.copytree(Path(__file__).resolve().parents[1] / "profiles", tmp_path / "profiles")
    entry = "  ptb:\n    task: lm-word\n    files: {book.txt: {path: book.txt}}\n"
    (tmp_path / "params.yaml").write_text(text.replace("\ncorpora:\n", "\ncorpora:\n" + entry, 1))
    with pytest.raises(ConfigError, match=r"params.yaml line \d+: duplicate key 'ptb' \(first given at line \d+\)"):
        load_params(tmp_path / "params.yaml")
    # nor can a profile redeclare one: it may change a corpus's options only
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "profiles" / "cpu.yaml").write_text("corpora:\n  ptb: {files: {x.txt: {path: x.txt}}}\n")
    with pytest.raises(ConfigError, match=r"cpu.yaml: corpora.ptb: a profile may override `options` only"):
        load_params(tmp_path / "params.yaml")


def test_lm_run_on_a_parallel_corpus_fails_before_training(tmp_path):
    from rnnlab.stages.train import parse_runs
    from rnnlab.tasks.lm import bind_corpus, parse_run

    params = {"corpora": yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["corpora"]}
    params["train_lm"] = {"defaults": {}, "runs": {"x": {"corpus": "multi30k", "model": "lstm"}}}
    with pytest.raises(ConfigError, match=r"train_lm.runs.x.corpus: 'multi30k' is not a language-modelling corpus"):
        parse_runs(params, "train_lm")
    # and where params are not at hand: the prepared data decides
    (tmp_path / "multi30k").mkdir()
    run = parse_run({"corpus": "multi30k", "model": "lstm"}, "train_lm.runs.x")
    with pytest.raises(ConfigError, match=r"'multi30k': no prepared language-modelling corpus"):
        bind_corpus(run, tmp_path)


def repo_corpora_params() -> dict:
    return {"corpora": yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["corpora"]}


@pytest.mark.parametrize(
    ("section", "corpus", "message"),
    [
        (
            "train_seq2seq",
            "nosuch",
            r"train_seq2seq.runs.x.corpus: unknown corpus 'nosuch'; parallel corpora: \['multi30k'\]",
        ),
        ("train_seq2seq", "ptb", r"train_seq2seq.runs.x.corpus: 'ptb' is not a parallel corpus \(task 'lm-word'\)"),
        ("train_captioner", "nosuch", r"train_captioner.runs.x.corpus: unknown corpus 'nosuch'; captions corpora"),
        ("train_captioner", "multi30k", r"train_captioner.runs.x.corpus: 'multi30k' is not a captions corpus"),
    ],
)
def test_decoder_run_naming_an_unknown_or_wrong_task_corpus_fails_before_training(section, corpus, message):
    from rnnlab.stages.train import parse_runs

    params = repo_corpora_params()
    params[section] = {"defaults": {}, "runs": {"x": {"corpus": corpus}}}
    with pytest.raises(ConfigError, match=message):
        parse_runs(params, section)
    params[section]["runs"]["x"] = {}  # no corpus key: the built-in
    assert (
        parse_runs(params, section)["x"].corpus == {"train_seq2seq": "multi30k", "train_captioner": "flickr8k"}[section]
    )


def test_flickr8k_format_takes_no_extra_caption_sets():
    entry = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["corpora"]["flickr8k"]
    entry["eval_sets"] = {"more": "Flickr_8k.devImages.txt"}
    with pytest.raises(ConfigError, match=r"corpora.mine.eval_sets: extra caption sets are captions files"):
        parse_corpora({"mine": entry})


def test_built_ins_are_entries_of_the_same_mechanism():
    specs = repo_corpora()
    assert {n: s.task for n, s in specs.items()} == {
        "ptb": "lm-word",
        "wikitext2": "lm-word",
        "tinyshakespeare": "lm-char",
        "multi30k": "parallel",
        "flickr8k": "captions",
    }
    assert specs["tinyshakespeare"].carve.valid == 0.1 and specs["multi30k"].options.min_freq == 2


def test_carve_every_nth_and_eval_set(tmp_path, mirror):
    ptb_slice(tmp_path / "book.txt", mirror, 100)
    ptb_slice(tmp_path / "more.txt", mirror, 7, start=100)
    entry = book_entry(
        files={"book.txt": {"path": "book.txt"}, "more.txt": {"path": "more.txt"}},
        carve={"file": "book.txt", "by": "every_nth", "every": 10},
        eval_sets={"later": "more.txt"},
    )
    metrics = prepare(entry, tmp_path)["mine"]["splits"]
    assert {s: m["lines"] for s, m in metrics.items()} == {"train": 80, "valid": 10, "test": 10, "eval_later": 7}
    import pandas as pd

    lines = pd.read_parquet(tmp_path / "prepared" / "mine" / "lines.parquet")
    assert lines[lines.split == "valid"].line.tolist() == list(range(9, 101, 10))  # line i+1 with i % 10 == 8
    assert (tmp_path / "prepared" / "mine" / "eval_later.npy").is_file()


# ------------------------------------------------------------------ end to end through dvc repro


@pytest.mark.slow
def test_new_corpora_declared_in_params_run_end_to_end(tmp_path, mirror):
    import pipeline_repo as pr

    repo = pr.copy_repo(tmp_path / "repo")
    # real text under new names: a book-like slice of Tiny Shakespeare, a parallel set cut from Multi30k
    text = (mirror / "tinyshakespeare" / "input.txt").read_text().splitlines(keepends=True)
    (repo / "corpora").mkdir()
    (repo / "corpora" / "bard.txt").write_text("".join(text[:3000]))
    (repo / "corpora" / "bard_later.txt").write_text("".join(text[3000:3400]))
    for lang in ("en", "de"):
        with gzip.open(mirror / "multi30k" / "raw" / f"val.{lang}.gz", "rt") as fh:
            lines = [next(fh) for _ in range(400)]
        (repo / "corpora" / f"pairs.{lang}").write_text("".join(lines[:300]))
        (repo / "corpora" / f"later.{lang}").write_text("".join(lines[300:]))  # an extra test set

    def edit(params):
        pr.tiny_params(params)
        params["corpora"]["bard"] = {
            "task": "lm-word",
            "files": {"bard.txt": {"path": "corpora/bard.txt"}, "later.txt": {"path": "corpora/bard_later.txt"}},
            "carve": {"file": "bard.txt", "by": "lines", "valid": 0.05, "test": 0.05},
            "eval_sets": {"later": "later.txt"},
            "options": {"tokenizer": "word", "lowercase": True, "min_freq": 2},
        }
        params["corpora"]["pairs"] = {
            "task": "parallel",
            "files": {
                f"{n}.{lang}": {"path": f"corpora/{n}.{lang}"} for n in ("pairs", "later") for lang in ("en", "de")
            },
            "carve": {"file": {"src": "pairs.en", "tgt": "pairs.de"}, "by": "every_nth", "every": 10},
            "eval_sets": {"later": {"src": "later.en", "tgt": "later.de"}},
            "options": {"tokenizer": "word", "lowercase": True, "src_lang": "en", "tgt_lang": "de"},
        }
        runs = params["train_lm"]["runs"]
        runs.clear()
        runs["bard-ngram"] = {"corpus": "bard", "model": "ngram", "order": 3}
        for section in ("train_seq2seq", "train_captioner"):
            for run in params[section]["runs"].values():
                run["enabled"] = False
        # a translator on the new parallel corpus: a word-level model, a few batches (CI time)
        params["train_seq2seq"]["runs"]["pairs-attention"] = {
            "corpus": "pairs",
            "tokenizer": "word",
            "max_epochs": 1,
            "limit_train_batches": 4,
        }

    pr.edit_params(repo, edit)
    overlay = {"download": {"corpora": ["ptb", "multi30k", "flickr8k", "bard", "pairs"]}}
    overlay["prepare"] = {"corpora": ["ptb", "multi30k", "flickr8k", "bard", "pairs"]}
    profile = yaml.safe_load((repo / "profiles" / "tiny.yaml").read_text())
    profile["train_lm"]["runs"] = {}
    (repo / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(pr.merge(profile, overlay), sort_keys=False))
    pr.git_repo(repo)
    pr.run(["dvc", "repro", "evaluate"], repo, timeout=1500)

    prepare_metrics = json.loads((repo / "data/metrics/prepare.json").read_text())
    assert prepare_metrics["bard"]["splits"]["eval_later"]["lines"] == 400
    assert prepare_metrics["bard"]["splits"]["valid"]["lines"] == 150  # int(3000 * 0.95) - int(3000 * 0.9)
    assert {s: m["lines"] for s, m in prepare_metrics["pairs"]["splits"].items()} == {
        "train": 240,
        "valid": 30,
        "test": 30,
        "eval_later": 100,
    }
    lock = json.loads((repo / "data/corpora.lock.json").read_text())
    assert lock["bard"]["bard.txt"] == hashlib.sha256((repo / "corpora" / "bard.txt").read_bytes()).hexdigest()
    row = json.loads((repo / "data/metrics/train_lm/bard-ngram.json").read_text())
    assert row["corpus"] == "bard" and row["model"] == "ngram"
    table = json.loads((repo / "data/metrics/evaluate.json").read_text())
    test_row, later_row = table["lm"]["bard"]["ngram"], table["lm"]["bard"]["eval_later"]["ngram"]
    assert later_row["tokens"] > 1000 and later_row["eval_later_ppl"] > 1
    assert later_row["eval_later_ppl"] != test_row["test_ppl"]  # a different text, its own score
    report = (repo / "data/reports/index.md").read_text()
    assert "| bard | ngram | eval_later |" in report and "| bard | ngram | test |" in report
    # the translator trained on the declared parallel corpus, scored on its test split and eval set
    trained = json.loads((repo / "data/metrics/train_seq2seq/pairs-attention.json").read_text())
    assert trained["corpus"] == "pairs" and trained["test_set"] == "test"
    assert trained["pairs"] == {"train": 240, "val": 30, "test": 30}  # the carve rule's valid is the val split
    test_mt, later_mt = table["translation"]["pairs-attention"], table["translation"]["pairs-attention@eval_later"]
    assert test_mt["corpus"] == later_mt["corpus"] == "pairs" and later_mt["eval_set"] == "later"
    assert test_mt["test_sentences"] == 30 and later_mt["eval_later_sentences"] == 100
    assert test_mt["test_ppl"] == trained["test_ppl"]  # rescored from the saved folder: the training row
    assert later_mt["eval_later_ppl"] > 1 and later_mt["eval_later_ppl"] != test_mt["test_ppl"]
    assert "| | pairs-attention | pairs-attention@eval_later |" in report
    assert set(table["skipped"]) >= {"translation.multi30k-attention", "translation.multi30k-none"}
    shown = pr.run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "eval_later_ppl" in shown and "pairs-attention@eval_later" in shown


def test_url_file_is_fetched_and_checked_against_its_sha256(tmp_path, mirror):
    """A corpus from a URL (file:// here: no network) is verified; a wrong pin shows both sums."""
    book = ptb_slice(tmp_path / "site" / "book.txt", mirror, 120)
    sha = hashlib.sha256(book.read_bytes()).hexdigest()
    entry = book_entry(files={"book.txt": {"url": book.as_uri(), "sha256": sha}})
    assert prepare(entry, tmp_path)["mine"]["splits"]["train"]["lines"] == 96
    entry["files"]["book.txt"]["sha256"] = "f" * 64
    with pytest.raises(DownloadError, match=rf"expected sha256 {'f' * 64}, found {sha}; file removed"):
        fetch_corpus(parse_corpora({"mine": entry})["mine"], tmp_path / "raw2", None, retries=1, progress=False)


def test_empty_mirror_variable_means_no_mirror_for_tests_and_download(monkeypatch):
    import pipeline_repo as pr

    from rnnlab.data.download import resolve_mirror

    monkeypatch.setenv("RNNLAB_MIRROR", "")
    assert resolve_mirror("../shared/corpora") is None
    assert pr._test_mirror() == pr.REPO / ".corpora"  # fetched by scripts/fetch_corpora.py, not the repo root
    monkeypatch.delenv("RNNLAB_MIRROR")
    assert pr._test_mirror() == (pr.REPO.parent / "shared" / "corpora").resolve()


def test_fetch_script_cache_key_follows_the_checksums(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_corpora.py"
    params = Path(__file__).resolve().parents[1] / "params.yaml"

    def key(path):
        return subprocess.run(
            [sys.executable, script, "--key", "--params", path], capture_output=True, text=True, check=True
        ).stdout.strip()

    (tmp_path / "p.yaml").write_text(params.read_text().replace("fcea919f", "0cea919f"))
    assert len(key(params)) == 32 and key(params) != key(tmp_path / "p.yaml")


# ------------------------------------------------------------------ your own photos


def photo_corpus(root: Path, mirror: Path, images: int = 12, later: int = 2) -> dict:
    """``images`` real Flickr8k photos and their captions under a new corpus: a folder + JSON lines;
    the next ``later`` photos' captions an extra evaluation set (``later.jsonl``)."""
    (root / "photos").mkdir(parents=True)
    lines, names = [], []
    for text in (mirror / "flickr8k" / "Flickr8k.token.txt").read_text().splitlines():
        key, _, caption = text.partition("\t")
        name = key.rpartition("#")[0]
        if name not in names:
            if len(names) == images + later:
                break
            names.append(name)
            shutil.copy(mirror / "flickr8k" / "images" / name, root / "photos" / name)
        lines.append(json.dumps({"image": name, "caption": caption}) + "\n")
    (root / "caps.jsonl").write_text("".join(lines[: 5 * images]))
    (root / "later.jsonl").write_text("".join(lines[5 * images :]))
    return {
        "task": "captions",
        "files": {n: {"path": n} for n in ("caps.jsonl", "later.jsonl", "photos/")},
        "captions": {"format": "jsonl", "file": "caps.jsonl", "images": "photos"},
        "carve": {"file": "caps.jsonl", "by": "every_nth", "every": 4},  # by image: 6 / 3 / 3
        "eval_sets": {"later": "later.jsonl"},
        "options": {"tokenizer": "word", "lowercase": True},
    }


def test_declared_captions_corpus_is_prepared_encoded_and_trained_on(tmp_path, mirror, one_thread, monkeypatch):
    """A captions corpus declared only in params (real photos, a new name): prepare, the features
    stage on it (features.corpus), a captioner run naming it; a run naming it while the features
    are another corpus's is an error naming the run's key."""
    from rnnlab.data.feature_cache import INDEX_FILE, read_index
    from rnnlab.stages.features import features_stage
    from rnnlab.stages.train import train_stage
    from rnnlab.tasks.base import StagePaths

    monkeypatch.chdir(tmp_path)  # the stage loop's resume folders (data/checkpoints) land here
    entry = photo_corpus(tmp_path, mirror)
    splits = prepare(entry, tmp_path, "myphotos")["myphotos"]["splits"]
    assert {s: m["images"] for s, m in splits.items()} == {"train": 6, "valid": 3, "test": 3, "eval_later": 2}
    assert sum(m["lines"] for m in splits.values()) == 70  # 5 captions each, none dropped
    params = {
        "seed": 3,
        "tracking": {"enabled": False},
        "trainer": {"num_threads": 1, "progress_bar": False},
        "corpora": {"myphotos": entry},
        "features": {"corpus": "myphotos", "encoder": "efficientnet_lite0", "batch_size": 6, "num_workers": 0},
        "train_captioner": {
            "defaults": {
                "embedding_size": 8,
                "hidden_size": 16,
                "attention_size": 8,
                "batch_size": 3,
                "max_epochs": 1,
                "min_freq": 1,
                "max_len": 10,
                "beam_sizes": [1],
                "grid_images": 0,
                "coco_metrics": False,
            },
            "runs": {"mine": {"corpus": "myphotos", "decoder": "show_tell"}},
        },
    }
    features = tmp_path / "features" / "myphotos"
    metrics = features_stage(params, tmp_path / "prepared", tmp_path / "raw", features, tmp_path / "features.json")
    assert (metrics["corpus"], metrics["encoded"], metrics["bad_images"]) == ("myphotos", 14, 0)
    assert read_index(features / INDEX_FILE)["names"] == sorted(p.name for p in (tmp_path / "photos").iterdir())
    paths = StagePaths(prepared=tmp_path / "prepared", features=features, raw=tmp_path / "raw")
    out = tmp_path / "out"
    models, metrics_dir = out / "models", out / "metrics"
    row = train_stage(
        params,
        "train_captioner",
        "mine",
        paths,
        models / "captioner",
        metrics_dir / "train_captioner" / "mine.json",
        out / "p.json",
    )
    assert row["params"]["corpus"] == "myphotos" and (row["data"]["train_images"], row["data"]["test_images"]) == (6, 3)
    # evaluate: the test split and the extra set, each its own row named by the set
    from rnnlab.stages.evaluate import evaluate_stage

    params["evaluate"] = {"caption_beam_sizes": [1], "register_models": False}
    table = evaluate_stage(
        params, paths, models, metrics_dir, out / "evaluate.json", out / "reports", out / "plots", extra_png_dirs=()
    )
    test_row, later_row = table["captioning"]["mine"], table["captioning"]["mine@eval_later"]
    assert test_row["corpus"] == later_row["corpus"] == "myphotos" and later_row["eval_set"] == "later"
    assert test_row["greedy.bleu1"] == row["bleu"]["greedy"]["bleu1"]  # rescored: the training row
    assert test_row["greedy.bleu1"] != later_row["greedy.bleu1"]  # other images, their own score
    assert "| | mine | mine@eval_later |" in (out / "reports" / "index.md").read_text()
    # features of another corpus (a cache without these photos): the run's key is named
    other = tmp_path / "features" / "other"
    other.mkdir()
    index = read_index(features / INDEX_FILE)
    (other / INDEX_FILE).write_text(json.dumps({**index, "names": [f"x{i}.jpg" for i in range(12)]}))
    shutil.copy(features / "features.npy", other / "features.npy")
    with pytest.raises(ConfigError, match=r"train_captioner.runs.mine.corpus: the feature cache .*other holds none"):
        train_stage(
            params,
            "train_captioner",
            "mine",
            StagePaths(paths.prepared, other, paths.raw),
            out / "m2",
            out / "m2.json",
            out / "p2.json",
        )
