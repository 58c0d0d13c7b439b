"""MLflow pyfunc wrappers: serve trained rnnlab models over HTTP (``mlflow models serve``).

Three wrappers, each logged with its checkpoint as an artifact (the checkpoint carries the
vocabulary and tokenizer, so nothing is rebuilt from data) and an explicit signature:

=====================  ====================================================  =====================
registered name        input columns (``{"inputs": [{...}, ...]}``)           output column
=====================  ====================================================  =====================
rnnlab-lm-<c>-<model>  ``prompt`` str; optional ``tokens`` int (1..max),      ``text``
                       ``temperature`` float > 0, ``seed`` int
rnnlab-translator      ``text`` str (an English sentence); optional ``beam``  ``translation``
rnnlab-captioner       ``image`` str (base64 of a JPEG/PNG file); opt. beam   ``caption``
=====================  ====================================================  =====================

Bad input (missing column, empty text, a non-image, out-of-range numbers) is answered with an
``MlflowException(INVALID_PARAMETER_VALUE)``: the scoring server turns it into HTTP 400 with the
message, without a stack trace, and keeps serving. Any other failure inside ``predict`` is also
reported as a 400 message (its type and text, no traceback) so the client never sees a trace.

Request limits (the same 400, the message naming the record and the limit). Every record of a
request is checked before anything of it is tokenized, base64-decoded, decoded as an image or
run through a model, so one oversized record costs no model time:

============================  ==================================================================
``MAX_ROWS`` = 64             records per request
``MAX_TEXT_CHARS`` = 1000     characters of a ``prompt`` (LM) or ``text`` (translator), counted as
                              sent (before whitespace is stripped)
``MAX_IMAGE_BYTES`` = 4 MiB   image file per ``image`` record: its base64 text may be at most
                              ``MAX_IMAGE_B64_CHARS`` = 4 * ceil(MAX_IMAGE_BYTES / 3) = 5,592,408
                              characters, checked on the text before it is decoded (Flickr8k
                              JPEGs are < 30 KB)
``MAX_TOKENS`` = 500          ``tokens`` an LM record may ask for; ``beam`` at most ``MAX_BEAM`` = 10
============================  ==================================================================

The JSON body itself is read and parsed by MLflow's scoring server before ``predict`` runs (it
has no body-size limit of its own): put a reverse proxy with a body limit in front of a public
server, e.g. ``client_max_body_size 300m`` (64 images of 4 MiB, base64) in nginx.

Logging and registration (``log_and_register``) is done by the ``evaluate`` stage, into the
evaluation run (the training stages stay MLflow-optional); each registered version is tagged
``training_run_id`` with the run that trained it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

log = logging.getLogger(__name__)
MAX_TOKENS = 500  # longest generation one request may ask for
MAX_BEAM = 10
MAX_ROWS = 64  # records per request
MAX_TEXT_CHARS = 1000  # characters of one prompt / sentence to translate
MAX_IMAGE_BYTES = 4 * 2**20  # bytes of one image file
MAX_IMAGE_B64_CHARS = 4 * -(-MAX_IMAGE_BYTES // 3)  # its base64 text: checked before decoding


def _bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _rows(model_input: Any, required: str) -> list[dict]:
    """The request as a list of dicts; a clear error for any other shape."""
    if isinstance(model_input, (pd.DataFrame, list)) and len(model_input) > MAX_ROWS:
        raise _bad(f"{len(model_input)} records in one request; at most {MAX_ROWS}")
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = list(model_input)
    else:
        raise _bad(f"expected records with a {required!r} column, got {type(model_input).__name__}")
    if not rows:
        raise _bad("empty request: send at least one record")
    if len(rows) > MAX_ROWS:
        raise _bad(f"{len(rows)} records in one request; at most {MAX_ROWS}")
    for i, row in enumerate(rows):
        if required not in row:
            raise _bad(f"record {i}: missing column {required!r}")
    return rows


def _text(row: dict, key: str, i: int, max_chars: int = MAX_TEXT_CHARS) -> str:
    value = row.get(key)
    if isinstance(value, str) and len(value) > max_chars:  # before anything else touches it
        raise _bad(f"record {i}: {key!r} is {len(value)} characters long; at most {max_chars}")
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"record {i}: {key!r} must be a non-empty string, got {_short(value)}")
    return value.strip()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _image_text(row: dict, i: int) -> str:
    """The base64 text of record ``i``'s image, refused when it would decode to over MAX_IMAGE_BYTES."""
    value = row.get("image")
    if isinstance(value, str) and len(value) > MAX_IMAGE_B64_CHARS:
        raise _bad(
            f"record {i}: 'image' is {len(value)} base64 characters (about {len(value) * 3 // 4 / 2**20:.1f} "
            f"MiB); at most {MAX_IMAGE_B64_CHARS} ({MAX_IMAGE_BYTES // 2**20} MiB of image file)"
        )
    return _text(row, "image", i, max_chars=MAX_IMAGE_B64_CHARS)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _int(row: dict, key: str, i: int, default: int, low: int, high: int) -> int:
    value = row.get(key)
    if not _present(value):
        return default
    if isinstance(value, bool) or not float(value).is_integer() or not low <= int(value) <= high:
        raise _bad(f"record {i}: {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _float(row: dict, key: str, i: int, default: float, low_exclusive: float, high: float) -> float:
    value = row.get(key)
    if not _present(value):
        return default
    if isinstance(value, bool) or not low_exclusive < float(value) <= high:
        raise _bad(f"record {i}: {key!r} must be a number in ({low_exclusive}, {high}], got {value!r}")
    return float(value)


def _guard(fn):
    """Turn any non-MlflowException into a 400 message without a traceback."""

    def wrapper(self, context, model_input, params=None):
        try:
            return fn(self, context, model_input, params)
        except MlflowException:
            raise
        except Exception as exc:  # noqa: BLE001 - the client gets a message, never a trace
            log.exception("predict failed")
            raise _bad(f"{type(exc).__name__}: {exc}") from None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class LanguageModelPyfunc(PythonModel):
    """Text generation from a train_lm model (artifact ``checkpoint``: a neural ``model.ckpt``, or an
    n-gram run folder holding ``ngram.npz`` + ``vocab.json``)."""

    def load_context(self, context) -> None:
        from rnnlab.tasks.lm import load

        self.lm = load(Path(context.artifacts["checkpoint"]))
        config = context.model_config or {}
        self.lm.char_level = bool(config.get("char_level", self.lm.char_level))
        self.default_tokens = int(config.get("tokens", 30))

    @_guard
    def predict(self, context, model_input, params=None):
        from rnnlab.generate import sample

        requests = [
            (
                _text(row, "prompt", i),
                _int(row, "tokens", i, self.default_tokens, 1, MAX_TOKENS),
                _float(row, "temperature", i, 1.0, 0.0, 100.0),
                _int(row, "seed", i, 0, 0, 2**31 - 1),
            )
            for i, row in enumerate(_rows(model_input, "prompt"))
        ]  # every record checked first
        return pd.DataFrame({"text": [sample(self.lm, *request) for request in requests]})


class TranslatorPyfunc(PythonModel):
    """English -> German from a train_seq2seq checkpoint (artifact ``checkpoint``)."""

    def load_context(self, context) -> None:
        from rnnlab.tasks.translation import load

        self.task = load(context.artifacts["checkpoint"])
        self.default_beam = int((context.model_config or {}).get("beam", 5))

    @_guard
    def predict(self, context, model_input, params=None):
        rows = _rows(model_input, "text")
        texts = [_text(row, "text", i) for i, row in enumerate(rows)]
        beams = [_int(row, "beam", i, self.default_beam, 1, MAX_BEAM) for i, row in enumerate(rows)]
        out = []
        for beam in sorted(set(beams)):  # one batch per beam size, answers in request order
            idx = [i for i, b in enumerate(beams) if b == beam]
            for i, hyp in zip(idx, self.task.translate([texts[i] for i in idx], beam_size=beam)):
                out.append((i, hyp))
        return pd.DataFrame({"translation": [hyp for _, hyp in sorted(out)]})


class CaptionerPyfunc(PythonModel):
    """Image captioning from a train_captioner checkpoint (artifact ``checkpoint``; optional
    ``encoder_weights``): images arrive base64-encoded in the ``image`` column."""

    def load_context(self, context) -> None:
        from rnnlab.tasks.captioning import ImageCaptioner

        # Built once per worker: loading the checkpoint and the CNN per request cost seconds and memory.
        self.captioner = ImageCaptioner(context.artifacts["checkpoint"], context.artifacts.get("encoder_weights"))
        self.default_beam = int((context.model_config or {}).get("beam", 3))

    @_guard
    def predict(self, context, model_input, params=None):
        from rnnlab.data.images import load_image
        from rnnlab.errors import DataError

        rows = _rows(model_input, "image")
        texts = [_image_text(row, i) for i, row in enumerate(rows)]  # sizes checked before any decoding
        beams = {_int(row, "beam", i, self.default_beam, 1, MAX_BEAM) for i, row in enumerate(rows)}
        if len(beams) > 1:
            raise _bad(f"one beam size per request, got {sorted(beams)}")
        payloads = []
        for i, text in enumerate(texts):
            try:
                payloads.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise _bad(f"record {i}: 'image' is not valid base64") from None
        with tempfile.TemporaryDirectory(prefix="rnnlab-caption-") as tmp:
            paths = []
            for i, data in enumerate(payloads):
                path = Path(tmp) / f"record{i}"
                path.write_bytes(data)
                paths.append(path)
            try:
                images = [load_image(path) for path in paths]  # every image decoded before any is captioned
            except DataError as exc:
                raise _bad(str(exc).replace(tmp + "/", "")) from None
        return pd.DataFrame({"caption": self.captioner.caption(images, beam_size=beams.pop())})


# ----------------------------------------------------------------------------------------------
# Signatures, logging, registration
# ----------------------------------------------------------------------------------------------
def _schema(*cols: tuple[str, str, bool]) -> Schema:
    return Schema([ColSpec(kind, name, required=required) for name, kind, required in cols])


SIGNATURES = {
    "lm": ModelSignature(
        inputs=_schema(
            ("prompt", "string", True),
            ("tokens", "long", False),
            ("temperature", "double", False),
            ("seed", "long", False),
        ),
        outputs=_schema(("text", "string", True)),
    ),
    "translation": ModelSignature(
        inputs=_schema(("text", "string", True), ("beam", "long", False)),
        outputs=_schema(("translation", "string", True)),
    ),
    "captioning": ModelSignature(
        inputs=_schema(("image", "string", True), ("beam", "long", False)), outputs=_schema(("caption", "string", True))
    ),
}
WRAPPERS = {"lm": LanguageModelPyfunc, "translation": TranslatorPyfunc, "captioning": CaptionerPyfunc}


def registered_name(
    task: str, corpus: str | None = None, model: str | None = None, default_corpus: str | None = None
) -> str:
    """The registry name of a model: one per (corpus, model) for LMs; for translators and
    captioners one per corpus, the built-in corpus (``default_corpus``) keeping the short name, so a
    model of a user's corpus never competes with the built-in one for the ``champion`` alias."""
    if task == "lm":
        return f"rnnlab-lm-{corpus}-{model}"
    base = {"translation": "rnnlab-translator", "captioning": "rnnlab-captioner"}[task]
    return base if corpus is None or corpus == default_corpus else f"{base}-{corpus}"


# Distributions of ``rnnlab``'s own dependencies that serving never imports: left out of the model's
# requirements (DVC runs the pipeline; pycocoevalcap scores captions in the evaluate stage).
NOT_SERVING_DEPS = {"dvc", "pycocoevalcap"}


def requirements() -> list[str]:
    """The model's pip requirements: ``rnnlab``'s runtime dependencies (pyproject.toml, read from the
    installed package's metadata) pinned to the versions installed here, except NOT_SERVING_DEPS.

    ``rnnlab`` itself is not among them (it is not on PyPI): its code travels with the model
    (``code_paths``), so any environment manager (``virtualenv``, ``uv``, ``conda``, docker) can
    rebuild the model's environment."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    try:
        declared = md.requires("rnnlab") or []
    except md.PackageNotFoundError as exc:
        raise RuntimeError("rnnlab is not installed (pip install -e .): its dependencies are unknown") from exc
    pins = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (test tools)
        if req.name.lower() in NOT_SERVING_DEPS:
            continue
        pins.append(f"{req.name}=={md.version(req.name).split('+')[0]}")
    return sorted(pins, key=str.lower)


def package_copy(dest: Path) -> Path:
    """A copy of the ``rnnlab`` package (no ``__pycache__``) under ``dest``: the model's ``code_paths``
    entry. MLflow puts the model's ``code/`` folder first on ``sys.path`` when it loads the model."""
    import shutil

    import rnnlab

    target = Path(dest) / "rnnlab"
    shutil.copytree(Path(rnnlab.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _example_image() -> str:
    """base64 of a small PNG (64x64, a grey gradient): the captioner's input example."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example(task: str) -> pd.DataFrame:
    """One request record per model kind, logged with the model (the UI and ``mlflow models
    predict`` show it; MLflow checks at logging time that the model answers it)."""
    if task == "lm":
        return pd.DataFrame([{"prompt": "the company said", "tokens": 5, "temperature": 1.0, "seed": 0}])
    if task == "translation":
        return pd.DataFrame([{"text": "A man is riding a bike.", "beam": 2}])
    if task == "captioning":
        return pd.DataFrame([{"image": _example_image(), "beam": 1}])
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(WRAPPERS)}")


def pyfunc_kwargs(task: str, code_dir: Path, model_config: dict | None = None) -> dict:
    """What every rnnlab pyfunc model is saved/logged with (``mlflow.pyfunc.save_model`` /
    ``log_model`` keyword arguments, the artifacts aside): its wrapper, a copy of the ``rnnlab``
    package made under ``code_dir`` (``code_paths``), its signature, an input example and pinned
    pip requirements without ``rnnlab``."""
    return {
        "python_model": WRAPPERS[task](),
        "code_paths": [str(package_copy(Path(code_dir)))],
        "signature": SIGNATURES[task],
        "input_example": input_example(task),
        "model_config": model_config or {},
        "pip_requirements": requirements(),
    }


# ----------------------------------------------------------------------------------------------
# The registry alias ``champion``: the best validation model of each registered name
# ----------------------------------------------------------------------------------------------
CHAMPION_ALIAS = "champion"
# task -> the training-row metrics (data/metrics/train_*/<run>.json) that rank its models, in order:
# the first one every candidate has (a finite number) decides; "min" = lower is better.
CHAMPION_CRITERIA: dict[str, tuple[tuple[str, str], ...]] = {
    "lm": (("val_ppl", "min"),),
    "translation": (("val_sacrebleu_best", "max"), ("val_loss", "min")),
    "captioning": (("best_val_loss", "min"),),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def pick_champion(task: str, candidates: dict[Any, dict]) -> tuple[Any, str, float] | None:
    """``(key, metric, value)`` of the best of ``candidates`` (key -> training metrics row) by
    CHAMPION_CRITERIA[task]; None when no criterion is a finite number in every candidate."""
    for metric, direction in CHAMPION_CRITERIA[task]:
        values = {key: _number(row.get(metric)) for key, row in candidates.items()}
        if values and all(v is not None for v in values.values()):
            best = (min if direction == "min" else max)(values, key=values.get)
            return best, metric, values[best]
    return None


def set_champion(client, name: str, task: str, versions: dict[str, dict]) -> str | None:
    """Point alias ``champion`` of registered model ``name`` at the best of ``versions`` (version ->
    training metrics row); tag that version ``champion_metric``. Returns the version (None: no
    criterion to rank them, the alias is left as it was, with a warning)."""
    picked = pick_champion(task, versions)
    if picked is None:
        log.warning(
            "%s: no %s in every training row of versions %s: alias %r not set",
            name,
            " / ".join(m for m, _ in CHAMPION_CRITERIA[task]),
            sorted(versions),
            CHAMPION_ALIAS,
        )
        return None
    version, metric, value = picked
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    client.set_model_version_tag(name, str(version), "champion_metric", f"{metric}={value:g}")
    return str(version)


def _logged_model_home(client, training_run_id: str | None) -> tuple[str | None, str | None]:
    """(run id, experiment id) of the training run when the store has it, else (None, None)."""
    if not training_run_id:
        return None, None
    try:
        run = client.get_run(training_run_id)
    except MlflowException:
        log.warning(
            "training run %s is not in the tracking store: the model is linked to the evaluation run only",
            training_run_id,
        )
        return None, None
    return run.info.run_id, run.info.experiment_id


def log_and_register(
    task: str,
    checkpoint: Path,
    name: str,
    run_id: str,
    tracking_uri: str,
    model_config: dict | None = None,
    extra_artifacts: dict | None = None,
    training_run_id: str | None = None,
    register: bool = True,
    run_name: str | None = None,
) -> dict:
    """Log ``checkpoint`` as a pyfunc model and register it as ``name``.

    The model ships its code (a copy of the ``rnnlab`` package, ``code_paths``), pinned pip
    requirements without ``rnnlab`` (:func:`requirements`), a signature and an input example, so
    it loads wherever its requirements install. Lineage: the model is a logged model *of the
    training run* ``training_run_id`` (its source run and one of its outputs: the run page and
    the runs table's Models column show it; the registered version's run is the training run),
    and an input of the evaluation run ``run_id``. Without a training run in the store it is a
    logged model of the evaluation run.

    Returns ``{"model_uri", "model_id", "registered_name", "version"}``."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    artifacts = {"checkpoint": str(checkpoint), **{k: str(v) for k, v in (extra_artifacts or {}).items()}}
    model_name = (run_name or name).replace("/", "-")
    source_run, experiment_id = _logged_model_home(client, training_run_id)
    if experiment_id is None:
        experiment_id = client.get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(
        name=model_name, source_run_id=source_run or run_id, experiment_id=experiment_id, tags={"task": task}
    )
    with tempfile.TemporaryDirectory(prefix="rnnlab-code-") as code:
        info = mlflow.pyfunc.log_model(
            name=model_name,
            model_id=logged.model_id,
            artifacts=artifacts,
            **pyfunc_kwargs(task, Path(code), model_config),
        )
    client.log_outputs(source_run or run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if source_run:
        client.log_inputs(run_id, models=[LoggedModelInput(logged.model_id)])
    out = {"model_uri": info.model_uri, "model_id": logged.model_id, "registered_name": None, "version": None}
    if register:
        version = mlflow.register_model(info.model_uri, name)
        if training_run_id:
            client.set_model_version_tag(name, version.version, "training_run_id", training_run_id)
        client.set_model_version_tag(name, version.version, "evaluation_run_id", run_id)
        if run_name:
            client.set_model_version_tag(name, version.version, "rnnlab.run", run_name)
        out.update(registered_name=name, version=int(version.version))
    return out


def encode_image(path: str | Path) -> str:
    """base64 text of an image file, as the captioner's ``image`` column expects."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def request_body(records: list[dict]) -> str:
    """The JSON body ``/invocations`` expects for these records."""
    return json.dumps({"inputs": records})
