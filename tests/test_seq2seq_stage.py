"""Stage train_seq2seq, evaluate_translation_checkpoint and `rnnlab translate`, on a tiny profile of
the real Multi30k (300 train / 60 val pairs, the whole 1,000-sentence test set, 32-unit models,
a few seconds of training per row) with MLflow in a temporary sqlite store."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rnnlab.cli import main as cli_main
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.seq2seq_eval import evaluate_translation_checkpoint
from rnnlab.seq2seq_stage import parse_train_seq2seq_config, train_seq2seq_stage
from rnnlab.translate import load_translator

RUNS = ("multi30k-attention", "multi30k-none")
BEAMS = [1, 2]


def tiny_train_seq2seq() -> dict:
    """The tiny ``train_seq2seq`` section (also the end-to-end pipeline test profile)."""
    return {
        "experiment": "rnnlab-seq2seq-test",
        "defaults": {"tokenizer": "bpe", "bpe_vocab_size": 400, "embedding_size": 32, "hidden_size": 32,
                     "max_len": 20, "batch_size": 32, "max_epochs": 2, "limit_train_batches": 8,
                     "max_time_minutes": None, "lr": 0.01, "beam_sizes": BEAMS, "heatmaps": 2, "num_threads": 1,
                     "max_train_pairs": 300, "max_val_pairs": 60},
        "runs": [{"name": RUNS[0], "attention": "bahdanau"},
                 {"name": RUNS[1], "attention": "none", "tokenizer": "word", "min_freq": 2}],
    }


@pytest.fixture(scope="module")
def stage(tmp_path_factory, mirror):
    """The stage run once on the tiny profile: (tmp root, metrics table, prepared dir, tracking uri)."""
    from rnnlab.data.readers import read_parallel_corpus
    from rnnlab.io import write_parquet

    root = tmp_path_factory.mktemp("seq2seq-stage")
    prepared = root / "data" / "prepared"
    (prepared / "multi30k").mkdir(parents=True)
    write_parquet(prepared / "multi30k" / "pairs.parquet", read_parallel_corpus(mirror / "multi30k"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = {"seed": 7, "tracking": {"enabled": True}, "train_seq2seq": tiny_train_seq2seq()}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        table = train_seq2seq_stage(params, Path("data/prepared"), Path("data/models/seq2seq"),
                                    Path("data/metrics/train_seq2seq.json"), Path("data/plots/train_seq2seq"))
    torch.set_num_threads(threads)
    return root, table, prepared, uri


def test_stage_writes_models_metrics_plots_and_mlflow_runs(stage):
    root, table, _, uri = stage
    assert json.loads((root / "data/metrics/train_seq2seq.json").read_text()) == json.loads(json.dumps(table))
    assert sorted(table) == sorted(RUNS)
    for name in RUNS:
        row, folder = table[name], root / "data/models/seq2seq" / name
        for file in ("model.ckpt", "vocab.src.json", "vocab.tgt.json", "tokenizer.src.json", "tokenizer.tgt.json",
                     "config.json", "history.json", "bleu_vs_beam.json", "bleu_vs_beam.png", "test_hyps_beam2.txt"):
            assert (folder / file).is_file(), file
        assert row["model_path"] == f"data/models/seq2seq/{name}"
        assert row["pairs"] == {"train": 300, "val": 60, "test": 1000}
        assert row["beam1_equals_greedy"] is True
        assert row["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        assert "case:lc" in row["tok_lc_bleu_signature"]
        for key in ("sacrebleu", "chrf", "tok_lc_bleu"):
            for decode in ("greedy", "beam1", "beam2"):
                assert 0.0 <= row[f"{key}_{decode}"] <= 100.0
        assert row["chrf_beam2"] > 0.0
        assert row["test_ppl"] < row["tgt_vocab_size"]  # better than a uniform guess after 16 steps
        assert 1.0 < row["test_ppl"] < 5000 and 1.0 < row["val_ppl"] < 5000
        assert row["epochs"] == 2 and row["steps"] == 16 and row["params"] > 10_000
        assert row["train_wall_s"] > 0 and row["sentences_per_s_beam2"] > 0
        assert row["truncated"]["test_src"] > 0 or row["truncated"]["test_tgt"] > 0  # max_len 20 cuts some
        assert re.fullmatch(r"[0-9a-f]{32}", row["mlflow_run_id"])
    assert len(list((root / "data/models/seq2seq" / RUNS[0] / "attention").glob("*.png"))) == 2
    assert not (root / "data/models/seq2seq" / RUNS[1] / "attention").exists()  # no attention to draw
    rows = json.loads((root / "data/plots/train_seq2seq/bleu_vs_beam.json").read_text())
    assert [(r["run"], r["beam"]) for r in rows] == [(n, b) for n in RUNS for b in BEAMS]
    assert rows[1]["bleu"] == table[RUNS[0]]["sacrebleu_beam2"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(table[RUNS[0]]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["final/sacrebleu_beam2"] == table[RUNS[0]]["sacrebleu_beam2"]
    assert run.data.params["attention"] == "bahdanau" and run.data.tags["task"] == "translation"
    artifacts = {a.path for top in ("model", "attention") for a in client.list_artifacts(run.info.run_id, top)}
    assert {"model/model.ckpt", "model/vocab.tgt.json", "attention/val_00.png"} <= artifacts


def test_evaluate_checkpoint_reproduces_the_training_numbers(stage, tmp_path):
    root, table, prepared, _ = stage
    name = RUNS[0]  # BPE + attention (the word-tokenizer model goes through the same code)
    folder = shutil.copytree(root / "data/models/seq2seq" / name, tmp_path / name)  # the folder alone
    result = evaluate_translation_checkpoint(folder, prepared / "multi30k", beam_sizes=BEAMS)
    row = table[name]
    shared = set(result) - {"beams", "test_sentences", "truncated_test_src"}
    assert shared >= {"sacrebleu_greedy", "sacrebleu_beam2", "chrf_beam1", "tok_lc_bleu_beam2", "test_ppl",
                      "params", "sacrebleu_signature", "beam1_equals_greedy"}
    assert {k: result[k] for k in shared} == {k: row[k] for k in shared}
    assert result["truncated_test_src"] == row["truncated"]["test_src"] and result["test_sentences"] == 1000
    assert [b["beam"] for b in result["beams"]] == BEAMS
    assert result["beams"][1]["sacrebleu"] == row["sacrebleu_beam2"]


def test_translate_cli_prints_a_translation_of_a_new_sentence(stage, capsys, monkeypatch):
    root, table, _, uri = stage
    folder = root / "data/models/seq2seq" / RUNS[0]
    sentence = "A man is riding a bike."
    task, _ = load_translator(folder)
    expected = task.translate([sentence], beam_size=2)[0]
    assert expected.strip()
    cli_main(["translate", sentence, "--beam", "2", "--run", str(folder)])
    assert capsys.readouterr().out == expected + "\n"
    # the default --run is data/models/seq2seq/multi30k-attention (relative to the working directory)
    monkeypatch.chdir(root)
    cli_main(["translate", sentence, "--beam", "2"])
    assert capsys.readouterr().out == expected + "\n"
    # an MLflow run id resolves to the run's model/ artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cli_main(["translate", sentence, "--beam", "2", "--run", table[RUNS[0]]["mlflow_run_id"]])
    assert capsys.readouterr().out == expected + "\n"


def test_translate_cli_stdin_blank_lines_truncation_and_unknown_words(stage, capsys, monkeypatch):
    root, _, _, _ = stage
    folder = root / "data/models/seq2seq" / RUNS[1]  # the word-tokenizer model
    task, _ = load_translator(folder)
    long_line = "two dogs run on the grass " * 10  # 60 words > max_len 20
    lines = ["A dog runs.", "", "   ", long_line, "zyzzyva qwxv"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    cli_main(["translate", "--beam", "1", "--run", str(folder)])
    captured = capsys.readouterr()
    out = captured.out.split("\n")
    assert len(out) == 6 and out[-1] == ""  # one output line per input line
    assert out[1] == "" and out[2] == ""
    assert out[:5] == [task.translate([s], beam_size=1)[0] if s.strip() else "" for s in lines]
    assert "2 empty or whitespace-only line(s)" in captured.err
    assert "1 sentence(s) longer than 20 tokens were truncated" in captured.err
    assert task.encode_sources(["zyzzyva qwxv"])[0].tolist() == [Vocab.unk_id, Vocab.unk_id]


def test_translate_cli_bad_input_is_a_clear_error(stage, capsys, tmp_path):
    root, _, prepared, _ = stage
    folder = root / "data/models/seq2seq" / RUNS[0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["translate", "   ", "--run", str(folder)])
    assert exit_info.value.code == 2 and "empty or whitespace-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["translate", "a dog", "--run", str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
    # a vocabulary file beside the checkpoint that does not match the checkpoint's own
    bad = shutil.copytree(folder, tmp_path / "bad")
    vocab = Vocab.load(bad / "vocab.tgt.json")
    Vocab(vocab.itos[:-1]).save(bad / "vocab.tgt.json")
    n = len(vocab)
    with pytest.raises(SystemExit):
        cli_main(["translate", "a dog", "--run", str(bad)])
    assert re.search(rf"\({n} tokens.*\({n - 1} tokens", capsys.readouterr().err)
    with pytest.raises(RnnlabError, match=rf"\({n} tokens.*\({n - 1} tokens"):
        evaluate_translation_checkpoint(bad, prepared)


def test_config_errors_name_the_key():
    good = tiny_train_seq2seq()
    parse_train_seq2seq_config(good)
    bad = tiny_train_seq2seq()
    bad["runs"][1]["foo"] = 1
    with pytest.raises(ConfigError, match=r"train_seq2seq\.runs\[1\]\.foo: unknown key"):
        parse_train_seq2seq_config(bad)
    bad = tiny_train_seq2seq()
    bad["defaults"]["hiden_size"] = 1
    with pytest.raises(ConfigError, match=r"train_seq2seq\.defaults\.hiden_size: unknown key"):
        parse_train_seq2seq_config(bad)
    bad = tiny_train_seq2seq()
    bad["runs"][0]["attention"] = "dot"
    with pytest.raises(ConfigError, match=r"train_seq2seq\.runs\[0\]\.attention"):
        parse_train_seq2seq_config(bad)
    bad = tiny_train_seq2seq()
    bad["runs"][1]["name"] = RUNS[0]
    with pytest.raises(ConfigError, match="unique"):
        parse_train_seq2seq_config(bad)
    bad = tiny_train_seq2seq()
    bad["defaults"]["max_train_pairs"] = 0
    with pytest.raises(ConfigError, match=r"runs\[0\]\.max_train_pairs: expected null or an integer >= 1"):
        parse_train_seq2seq_config(bad)
