"""Serving: the registered tiny PTB LM answers real HTTP requests from `mlflow models serve`
(models:/rnnlab-lm-ptb-lstm@champion, --env-manager local, 127.0.0.1); malformed requests get a
4xx message without a stack trace and the server keeps answering. The wrappers' input checks are
also tested in-process through mlflow.pyfunc.load_model. A logged model loads and predicts in a
subprocess where the repository's rnnlab is not importable (tests/load_without_rnnlab.py), and the
alias ``champion`` points at the best validation version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from local_server import local_service
from tiny_lm_store import lm_store  # noqa: F401 - fixture

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def sampled_tokens(text: str) -> int:
    """Tokens in a generated text: its words plus its line breaks (each sampled ``<eos>`` is one)."""
    return len(text.split()) + text.count("\n")


def test_sampled_tokens_counts_eos_line_breaks():
    from rnnlab.generate import detokenize

    for tokens in (["a", "b"], ["a", "<eos>", "b"], ["<eos>", "a"], ["a", "<eos>"], ["a", "<eos>", "<eos>", "b"]):
        assert sampled_tokens(detokenize(tokens, char_level=False)) == len(tokens), tokens


def post(url: str, body: bytes | str, timeout: float = 60) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(lm_store):  # noqa: F811
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": lm_store.uri,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(VENV_BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/rnnlab-lm-ptb-lstm@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        "{port}",
    ]
    with local_service(cmd, lm_store.root / "serve.log", "/ping", env=env, cwd=lm_store.root) as (base, proc):
        yield base, proc


def test_http_generation_and_bad_requests(server):
    base, proc = server
    url = base + "/invocations"
    body = {
        "inputs": [
            {"prompt": "the company said", "tokens": 8, "seed": 3},
            {"prompt": "the company said", "tokens": 8, "seed": 3},
        ]
    }
    status, answer = post(url, json.dumps(body))
    assert status == 200, answer
    texts = [p["text"] for p in answer["predictions"]]
    assert sampled_tokens(texts[0]) == 8
    assert texts[0] == texts[1]  # same seed, same sample
    bad = {
        "empty prompt": '{"inputs": [{"prompt": "   "}]}',
        "wrong column": '{"inputs": [{"text": "the"}]}',
        "wrong shape": '{"data": [["the"]]}',
        "a bare list": "[1, 2, 3]",
        "a string for records": '{"inputs": "the"}',
        "not JSON": "not json at all",
        "too many tokens": '{"inputs": [{"prompt": "the", "tokens": 100000}]}',
        "bad temperature": '{"inputs": [{"prompt": "the", "temperature": -1}]}',
        "too many records": json.dumps({"inputs": [{"prompt": "the", "tokens": 1}] * 65}),
        "prompt too long": json.dumps(
            {"inputs": [{"prompt": "the", "tokens": 1}, {"prompt": "the " * 300, "tokens": 1}]}
        ),
    }
    for what, payload in bad.items():
        status, answer = post(url, payload)
        assert 400 <= status < 500, (what, status, answer)
        assert answer["message"], what
        assert "Traceback" not in json.dumps(answer), what
    assert "'prompt' must be a non-empty string" in post(url, bad["empty prompt"])[1]["message"]
    for what, message in (
        ("too many records", "65 records in one request; at most 64"),
        ("prompt too long", "record 1: 'prompt' is 1200 characters long; at most 1000"),
    ):
        status, answer = post(url, bad[what])
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (what, status, answer)
        assert message in answer["message"], (what, answer)
    assert proc.poll() is None  # still serving
    assert post(url, json.dumps(body))[0] == 200


def test_pyfunc_in_process(lm_store):  # noqa: F811
    import mlflow

    mlflow.set_tracking_uri(lm_store.uri)
    model = mlflow.pyfunc.load_model("models:/rnnlab-lm-ptb-lstm/1")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["prompt", "tokens", "temperature", "seed"]
    out = model.predict(pd.DataFrame({"prompt": ["the market"], "tokens": [5], "seed": [1]}))
    assert list(out.columns) == ["text"] and sampled_tokens(out["text"][0]) == 5
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="non-empty string"):
        model.predict(pd.DataFrame({"prompt": [""]}))

    ngram = mlflow.pyfunc.load_model("models:/rnnlab-lm-ptb-ngram@champion")
    first = ngram.predict(pd.DataFrame({"prompt": ["the market"], "tokens": [6], "seed": [2]}))["text"][0]
    assert sampled_tokens(first) == 6
    long = ngram.predict(pd.DataFrame({"prompt": ["the market"], "tokens": [200], "seed": [1]}))["text"][0]
    assert long.count("\n") >= 2 and sampled_tokens(long) == 200  # <eos> sampled (line breaks): still 200 tokens
    assert ngram.predict(pd.DataFrame({"prompt": ["the market"], "tokens": [6], "seed": [2]}))["text"][0] == first


def test_captioner_wrapper_rejects_non_images(tmp_path):
    """No captioner checkpoint is needed to refuse bytes that are not base64 / not an image."""
    from mlflow.exceptions import MlflowException

    from rnnlab.serving import CaptionerPyfunc, encode_image

    wrapper = CaptionerPyfunc()
    wrapper.checkpoint, wrapper.encoder_weights, wrapper.default_beam = tmp_path / "none.ckpt", None, 3
    with pytest.raises(MlflowException, match="not valid base64"):
        wrapper.predict(None, pd.DataFrame({"image": ["%%% not base64"]}))
    (tmp_path / "x.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(MlflowException) as err:
        wrapper.predict(None, pd.DataFrame({"image": [encode_image(tmp_path / "x.jpg")]}))
    assert err.value.get_http_status_code() == 400 and "record0" in err.value.message
    assert str(tmp_path) not in err.value.message


def _save_pyfunc(task: str, checkpoint: Path, path: Path):
    """Saved as evaluate logs it (``pyfunc_kwargs``); its input example must be answered."""
    import mlflow

    from rnnlab.serving import pyfunc_kwargs

    code = path.parent / f"{path.name}-code"
    mlflow.pyfunc.save_model(str(path), artifacts={"checkpoint": str(checkpoint)}, **pyfunc_kwargs(task, code))
    model = mlflow.pyfunc.load_model(str(path))
    example = model.input_example
    assert example is not None and len(model.predict(example)) == len(example) == 1
    return model


def test_translator_pyfunc_in_process(mirror, tmp_path):
    """A small seq2seq model on 8 real Multi30k pairs (untrained weights: the wrapper is what is tested)
    answers exactly as the library's translate(), keeps request order, and refuses bad records."""
    import pytorch_lightning as pl
    import torch
    from mlflow.exceptions import MlflowException

    from rnnlab.data.parallel import read_multi30k
    from rnnlab.data.tokenize import WordTokenizer
    from rnnlab.data.vocab import Vocab
    from rnnlab.tasks.translation import TranslationTask

    train = read_multi30k(mirror / "multi30k" / "raw").query("split == 'train'").head(8)
    words = WordTokenizer(lowercase=True), WordTokenizer(lowercase=False)
    src_vocab = Vocab.build(words[0].tokenize(s) for s in train["src"])
    tgt_vocab = Vocab.build(words[1].tokenize(s) for s in train["tgt"])
    torch.manual_seed(0)
    task = TranslationTask(
        len(src_vocab),
        len(tgt_vocab),
        src_vocab=src_vocab,
        tgt_vocab=tgt_vocab,
        src_tokenizer=words[0],
        tgt_tokenizer=words[1],
        embedding_size=16,
        hidden_size=16,
        num_layers=1,
        dropout=0.0,
        attention="bahdanau",
        lr=0.01,
        label_smoothing=0.0,
        decode_max_len=12,
    ).eval()
    ckpt = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "model.ckpt")
    model = _save_pyfunc("translation", tmp_path / "model.ckpt", tmp_path / "pyfunc")
    sentences = train["src"].tolist()[:3]
    out = model.predict(pd.DataFrame({"text": sentences, "beam": [2, 1, 2]}))
    assert list(out.columns) == ["translation"]
    assert out["translation"][1] == task.translate([sentences[1]], beam_size=1)[0]
    assert out["translation"][0] == task.translate([sentences[0]], beam_size=2)[0]
    for bad, message in (
        (pd.DataFrame({"text": [""]}), "non-empty string"),
        (pd.DataFrame({"text": ["a dog ."], "beam": [99]}), "'beam' must be an integer"),
    ):
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(bad)
        assert err.value.get_http_status_code() == 400


def test_captioner_pyfunc_in_process(mirror, tmp_path):
    """A small captioner (small_cnn encoder, no downloaded weights) captions base64 JPEGs of real
    Flickr8k images through the pyfunc model; a non-image is a 400 naming the record."""
    import torch
    from mlflow.exceptions import MlflowException

    from rnnlab.data.vocab import Vocab
    from rnnlab.serving import encode_image
    from rnnlab.tasks.captioning import CaptioningTask

    vocab = Vocab.build([["a", "dog", "runs", "on", "the", "grass"]])
    torch.manual_seed(0)
    task = CaptioningTask(
        "soft_attention",
        len(vocab),
        256,
        embedding_size=16,
        hidden_size=16,
        attention_size=16,
        dropout=0.0,
        max_len=8,
        encoder="small_cnn",
        vocab_fingerprint=vocab.fingerprint(),
        vocab=vocab,
    )
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "model.ckpt")
    model = _save_pyfunc("captioning", tmp_path / "model.ckpt", tmp_path / "pyfunc")
    images = sorted((mirror / "flickr8k" / "images").rglob("*.jpg"))[:2]
    out = model.predict(pd.DataFrame({"image": [encode_image(p) for p in images]}))
    assert list(out.columns) == ["caption"] and len(out) == 2
    assert all(isinstance(c, str) and set(c.split()) <= set(vocab.itos) for c in out["caption"])
    (tmp_path / "bad.jpg").write_bytes(b"GIF89a not really")
    with pytest.raises(MlflowException, match="record1") as err:
        model.predict(pd.DataFrame({"image": [encode_image(images[0]), encode_image(tmp_path / "bad.jpg")]}))
    assert err.value.get_http_status_code() == 400


def test_request_limits_are_refused_before_anything_is_decoded(tmp_path, monkeypatch):
    """Over MAX_ROWS records, a text over MAX_TEXT_CHARS, a base64 image over MAX_IMAGE_B64_CHARS: a 400
    naming the record and the limit, and no model call / no base64 decoding for any record of it."""
    import base64

    from mlflow.exceptions import MlflowException

    import rnnlab.generate
    from rnnlab import serving

    calls = []
    monkeypatch.setattr(rnnlab.generate, "sample", lambda *a: calls.append(("sample", a)) or "x")
    real_b64decode = base64.b64decode
    monkeypatch.setattr(
        serving.base64, "b64decode", lambda *a, **k: calls.append(("b64", a)) or real_b64decode(*a, **k)
    )

    class NoModel:
        def translate(self, *a, **k):
            calls.append(("translate", a))
            return ["x"] * len(a[0])

    lm, translator, captioner = serving.LanguageModelPyfunc(), serving.TranslatorPyfunc(), serving.CaptionerPyfunc()
    lm.lm, lm.default_tokens = object(), 5
    translator.task, translator.default_beam = NoModel(), 5
    captioner.checkpoint, captioner.encoder_weights, captioner.default_beam = tmp_path / "none.ckpt", None, 3

    def refused(wrapper, frame: pd.DataFrame, message: str) -> None:
        with pytest.raises(MlflowException) as err:
            wrapper.predict(None, frame)
        assert err.value.get_http_status_code() == 400 and err.value.error_code == "INVALID_PARAMETER_VALUE"
        assert message in err.value.message, err.value.message
        assert len(err.value.message) < 300  # the oversized value is not echoed back

    long_text = "a dog runs . " * 77  # 1001 characters
    assert len(long_text) == serving.MAX_TEXT_CHARS + 1
    refused(lm, pd.DataFrame({"prompt": ["the"] * (serving.MAX_ROWS + 1)}), "65 records in one request; at most 64")
    refused(lm, pd.DataFrame({"prompt": ["the market", long_text]}), "record 1: 'prompt' is 1001 characters long")
    refused(translator, pd.DataFrame({"text": ["a dog ."] * 65}), "at most 64")
    refused(translator, pd.DataFrame({"text": ["a dog .", long_text]}), "record 1: 'text' is 1001 characters long")
    image = "A" * (serving.MAX_IMAGE_B64_CHARS + 4)  # base64 of 4 MiB + 3 bytes
    refused(
        captioner,
        pd.DataFrame({"image": ["AAAA", image]}),
        f"record 1: 'image' is {len(image)} base64 characters (about 4.0 MiB); at most {serving.MAX_IMAGE_B64_CHARS}",
    )
    refused(captioner, pd.DataFrame({"image": ["AAAA"] * 65}), "at most 64")
    assert calls == []  # nothing was sampled, translated or base64-decoded
    # within the limits the records go through: exactly MAX_ROWS records, a text of MAX_TEXT_CHARS
    out = lm.predict(None, pd.DataFrame({"prompt": ["the"] * (serving.MAX_ROWS - 1) + [long_text[:-1]]}))
    assert len(out) == serving.MAX_ROWS and len(calls) == serving.MAX_ROWS
    assert translator.predict(None, pd.DataFrame({"text": [long_text[:-1]]}))["translation"].tolist() == ["x"]
    # an image of exactly MAX_IMAGE_BYTES passes the size check and is decoded (then refused: not an image)
    refused(
        captioner,
        pd.DataFrame({"image": [base64.b64encode(bytes(serving.MAX_IMAGE_BYTES)).decode()]}),
        "record0: not an image",
    )
    assert calls[-1][0] == "b64"


def test_logged_model_loads_and_predicts_where_rnnlab_is_not_importable(lm_store, tmp_path):  # noqa: F811
    """The model evaluate registered carries its code: a fresh interpreter started outside the
    repository, with the repository's rnnlab removed from sys.path (checked), loads it and answers
    its input example; the rnnlab it ran is the model's own copy and rnnlab is no requirement."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=lm_store.uri, OMP_NUM_THREADS="1")
    script = REPO / "tests" / "load_without_rnnlab.py"
    proc = subprocess.run(
        [sys.executable, str(script), "models:/rnnlab-lm-ptb-lstm@champion", str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rnnlab_file = Path(out["rnnlab_file"]).resolve()
    assert Path(out["model_path"]).resolve() / "code" / "rnnlab" / "__init__.py" == rnnlab_file
    assert REPO not in rnnlab_file.parents
    (prediction,) = out["prediction"]
    assert sampled_tokens(prediction["text"]) == 5  # the input example asks for 5 tokens
    names = {r.split("==")[0].lower() for r in out["requirements"]}
    assert "rnnlab" not in names and {"torch", "mlflow", "numpy", "pytorch-lightning"} <= names
    assert all("==" in r for r in out["requirements"]), out["requirements"]  # every requirement pinned


def test_pick_champion_follows_the_criteria_table():
    from rnnlab.serving import pick_champion

    assert pick_champion("lm", {"1": {"val_ppl": 300.0}, "2": {"val_ppl": 200.0}, "3": {"val_ppl": 250.0}}) == (
        "2",
        "val_ppl",
        200.0,
    )
    bleu = {"1": {"val_sacrebleu_best": 20.0, "val_loss": 2.0}, "2": {"val_sacrebleu_best": 10.0, "val_loss": 1.0}}
    assert pick_champion("translation", bleu)[:2] == ("1", "val_sacrebleu_best")  # highest BLEU, not lowest loss
    no_bleu = {"1": {"val_sacrebleu_best": None, "val_loss": 2.0}, "2": {"val_sacrebleu_best": None, "val_loss": 1.5}}
    assert pick_champion("translation", no_bleu) == ("2", "val_loss", 1.5)
    assert pick_champion("captioning", {"a": {"best_val_loss": 3.1}, "b": {"best_val_loss": 2.9}})[0] == "b"
    assert pick_champion("captioning", {"a": {"best_val_loss": 3.1}, "b": {}}) is None


def test_a_users_corpus_gets_its_own_registered_name():
    """A translator/captioner of a user's corpus is registered under its own name, so it never takes
    the built-in model's ``champion`` alias; the built-in corpus keeps the short name."""
    from rnnlab.serving import registered_name
    from rnnlab.tasks import captioning, translation

    assert registered_name("translation", "multi30k", "multi30k-attention", translation.CORPUS) == "rnnlab-translator"
    assert registered_name("translation", "pairs", "pairs-attention", translation.CORPUS) == "rnnlab-translator-pairs"
    assert registered_name("captioning", "flickr8k", "x", captioning.CORPUS) == "rnnlab-captioner"
    assert registered_name("captioning", "myphotos", "x", captioning.CORPUS) == "rnnlab-captioner-myphotos"
    assert registered_name("lm", "ptb", "lstm") == "rnnlab-lm-ptb-lstm"


def test_evaluate_points_champion_at_the_best_validation_version(lm_store, tmp_path):  # noqa: F811
    """Three versions of one registered name (the tiny LSTM logged three times with different
    validation numbers): the alias goes to the best (version 2), not to the latest (3)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rnnlab.stages.evaluate import register_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("champion-test", artifact_location=(tmp_path / "art").as_uri())
    eval_run = client.create_run(exp, run_name="evaluate").info.run_id
    ckpt = lm_store.root / "data/models/lm/ptb-lstm/model.ckpt"
    entries = [
        {"task": "lm", "corpus": "ptb", "model": "lstm", "name": name, "checkpoint": ckpt, "row": {}}
        | {"training_row": {"val_ppl": ppl}}
        for name, ppl in (("a", 300.0), ("b", 200.0), ("c", 250.0))
    ]
    try:
        registered = register_models(entries, eval_run, uri)
    finally:
        mlflow.set_tracking_uri(lm_store.uri)
    assert registered == {"a": "rnnlab-lm-ptb-lstm/1", "b": "rnnlab-lm-ptb-lstm/2", "c": "rnnlab-lm-ptb-lstm/3"}
    champion = client.get_model_version_by_alias("rnnlab-lm-ptb-lstm", "champion")
    assert str(champion.version) == "2" and champion.tags["champion_metric"] == "val_ppl=200"
    assert champion.tags["rnnlab.run"] == "b"
