"""Stage ``study``: the long-term-dependency study (lecture §3-4), self-contained.

Three experiments, each on the CPU in a few tens of seconds with the default params:

1. **Gradient flow** on real PTB windows: ‖∂L_T/∂h_t‖ against the lag T - t for a small
   vanilla RNN and LSTM, at initialisation and after ``train_steps`` of truncated-BPTT training
   on the PTB train stream. The pair is trained *inside this stage* (not read from train_lm), so
   the study does not depend on which runs ``train_lm.runs`` lists or how long they train.
   Norms are reported relative to lag 1 (each model's overall gradient scale cancels).
2. **Long-lag recall** (:mod:`rnnlab.study.long_lag`): accuracy vs L for RNN and LSTM with the
   same budget.
3. **Exploding gradients**: the same small RNN trained on PTB with plain SGD at a large learning
   rate, once with and once without clipping; the pre-clip gradient norm of every step.
4. **The n-gram's own lesson** (:mod:`rnnlab.study.ngram_orders`): Kneser-Ney val/test perplexity
   and the share of unseen test n-grams for orders 1..``max_order`` on each listed corpus.

Outputs: ``<plots>/{gradient_flow,long_lag,clipping,ngram_orders}.json`` (DVC plots), PNGs in
``<pictures>`` and the n-gram order table ``<pictures>/ngram_orders.json`` (the evaluate report's
input), ``<metrics>`` (key numbers), one MLflow run with all of them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnlab.config import parse_section, require
from rnnlab.data.lm_data import batchify
from rnnlab.errors import ConfigError
from rnnlab.io import read_json, write_json
from rnnlab.models.lm import LANGUAGE_MODELS, build_language_model
from rnnlab.models.lm_parts import detach_state
from rnnlab.study import ngram_orders
from rnnlab.study.gradient_flow import decay_per_step, gradient_norm_by_lag, windows_from_stream
from rnnlab.study.long_lag import fit_long_lag, set_forget_gate_bias, single_threaded

log = logging.getLogger(__name__)

RECURRENT = ("rnn", "lstm", "gru", "lstm_hand", "lstm_peephole")


@dataclass
class GradientFlowConfig:
    models: list[str] = field(default_factory=lambda: ["rnn", "lstm"])
    embedding_size: int = 64
    hidden_size: int = 64
    lstm_forget_bias: float = 1.0  # Gers et al. 2000 / Jozefowicz et al. 2015 init; 0 = framework default
    window: int = 40  # lags 1 .. window-1 are measured
    report_lag: int = 30  # metrics: norm at this lag / norm at lag 1
    batch_size: int = 16  # rows per measured window
    num_windows: int = 4  # measured windows (PTB valid, random offsets)
    train_steps: int = 200  # truncated-BPTT steps on the PTB train stream
    train_batch_size: int = 32
    bptt: int = 35
    lr: float = 0.003  # Adam
    clip: float = 1.0

    def validate(self, where: str) -> None:
        for m in self.models:
            if m not in RECURRENT:
                raise ConfigError(
                    f"{where}.models: {m!r} has no hidden state to differentiate; valid: {list(RECURRENT)}"
                )
        require(self.window >= 3, f"{where}.window", "an integer >= 3", self.window)
        require(
            1 < self.report_lag < self.window,
            f"{where}.report_lag",
            f"an integer in (1, window={self.window})",
            self.report_lag,
        )
        for key in ("embedding_size", "hidden_size", "batch_size", "num_windows", "train_batch_size", "bptt"):
            require(getattr(self, key) >= 1, f"{where}.{key}", "an integer >= 1", getattr(self, key))
        require(self.train_steps >= 0, f"{where}.train_steps", "an integer >= 0", self.train_steps)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.clip > 0, f"{where}.clip", "a number > 0", self.clip)


@dataclass
class LongLagConfig:
    models: list[str] = field(default_factory=lambda: ["rnn", "lstm"])
    lags: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 40])
    steps: int = 400  # Adam steps x batch_size fresh sequences, the same for every model
    batch_size: int = 32
    hidden_size: int = 32
    forget_bias: float = 3.0

    def validate(self, where: str) -> None:
        for m in self.models:
            if m not in LANGUAGE_MODELS:
                raise ConfigError(f"{where}.models: unknown model {m!r}; valid names: {sorted(LANGUAGE_MODELS)}")
        require(
            len(self.lags) >= 1 and all(lag >= 0 for lag in self.lags),
            f"{where}.lags",
            "a non-empty list of integers >= 0",
            self.lags,
        )
        require(self.steps >= 1, f"{where}.steps", "an integer >= 1", self.steps)


@dataclass
class ClippingConfig:
    model: str = "rnn"
    steps: int = 150
    lr: float = 2.0  # plain SGD, large on purpose: the unclipped run meets the exploding gradients
    clip: float = 0.25
    batch_size: int = 32
    bptt: int = 35
    hidden_size: int = 64

    def validate(self, where: str) -> None:
        if self.model not in RECURRENT:
            raise ConfigError(f"{where}.model: unknown recurrent model {self.model!r}; valid: {list(RECURRENT)}")
        require(self.steps >= 1, f"{where}.steps", "an integer >= 1", self.steps)
        require(self.lr > 0, f"{where}.lr", "a number > 0", self.lr)
        require(self.clip > 0, f"{where}.clip", "a number > 0", self.clip)


@dataclass
class StudyConfig:
    gradient_flow: GradientFlowConfig
    long_lag: LongLagConfig
    clipping: ClippingConfig
    ngram_orders: ngram_orders.NgramOrdersConfig = field(default_factory=ngram_orders.NgramOrdersConfig)
    corpus: str = "ptb"
    experiment: str = "rnnlab-study"

    def validate(self, where: str) -> None:
        if not self.corpus or "/" in self.corpus:
            raise ConfigError(f"{where}.corpus: expected a corpus name of params corpora, got {self.corpus!r}")


def parse_study_config(data: dict) -> StudyConfig:
    return parse_section(StudyConfig, data, "study")


# ------------------------------------------------------------------------------ experiments


def _small_model(kind: str, vocab_size: int, emb: int, hid: int, forget_bias: float) -> nn.Module:
    model = build_language_model(kind, vocab_size, embedding_size=emb, hidden_size=hid, num_layers=1, dropout=0.0)
    if forget_bias:
        set_forget_gate_bias(model, forget_bias)
    return model


def train_tbptt(
    model: nn.Module,
    train_ids: np.ndarray,
    steps: int,
    batch_size: int,
    bptt: int,
    optimizer: torch.optim.Optimizer,
    clip: float | None,
) -> list[dict]:
    """``steps`` truncated-BPTT updates over the batchified stream (state carried, detached);
    returns per-step ``{step, loss, grad_norm}`` with the gradient norm measured *before* clipping.
    Stops early (recorded) if the loss or the gradient is not finite."""
    data = batchify(train_ids, batch_size)  # [n, batch]
    model.train()
    state = model.init_state(batch_size)
    log_rows = []
    pos = 0
    for step in range(steps):
        if pos + bptt + 1 > data.size(0):
            pos, state = 0, model.init_state(batch_size)
        tokens, targets = data[pos : pos + bptt], data[pos + 1 : pos + 1 + bptt]
        pos += bptt
        state = detach_state(state)
        logits, state = model(tokens, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf))
        log_rows.append({"step": step, "loss": float(loss.item()), "grad_norm": norm})
        if not (math.isfinite(norm) and math.isfinite(loss.item())):
            break
        optimizer.step()
    return log_rows


def _norms_float64(model: nn.Module, windows: list[torch.Tensor]) -> np.ndarray:
    """Gradient norms by lag measured on a float64 copy: the RNN's norm falls below float32's
    smallest number (~1e-45) within a few tens of steps, and would read as exactly 0."""
    return gradient_norm_by_lag(copy.deepcopy(model).double(), windows)


def gradient_flow_experiment(
    cfg: GradientFlowConfig, train_ids: np.ndarray, valid_ids: np.ndarray, vocab_size: int, seed: int
) -> tuple[list[dict], dict]:
    windows = windows_from_stream(valid_ids, cfg.window, cfg.batch_size, cfg.num_windows, seed=seed)
    curves: dict[str, np.ndarray] = {}
    metrics: dict = {}
    for kind in cfg.models:
        torch.manual_seed(seed)
        model = _small_model(
            kind, vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.lstm_forget_bias if "lstm" in kind else 0.0
        )
        curves[f"{kind}_init"] = _norms_float64(model, windows)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        steps = train_tbptt(model, train_ids, cfg.train_steps, cfg.train_batch_size, cfg.bptt, optimizer, cfg.clip)
        curves[f"{kind}_trained"] = _norms_float64(model, windows)
        last_loss = round(float(np.mean([r["loss"] for r in steps[-10:]])), 4) if steps else None
        metrics[kind] = {"train_loss_last": last_loss}
        for phase in ("init", "trained"):
            norms = curves[f"{kind}_{phase}"]
            metrics[kind][phase] = {
                f"kept_at_lag_{cfg.report_lag}": float(f"{norms[cfg.report_lag] / norms[1]:.4g}"),
                "decay_per_step": round(decay_per_step(norms, 1, cfg.report_lag), 4),
            }
    rows = []
    for lag in range(1, cfg.window):
        row = {"lag": lag}
        for name, norms in curves.items():
            row[name] = float(f"{norms[lag] / norms[1]:.6g}")  # relative to lag 1
            row[f"{name}_abs"] = float(f"{norms[lag]:.6g}")
        rows.append(row)
    if "rnn" in cfg.models and "lstm" in cfg.models:
        key = f"kept_at_lag_{cfg.report_lag}"
        for phase in ("init", "trained"):
            metrics[f"lstm_over_rnn_at_lag_{cfg.report_lag}_{phase}"] = float(
                f"{metrics['lstm'][phase][key] / metrics['rnn'][phase][key]:.4g}"
            )
    return rows, metrics


def long_lag_experiment(cfg: LongLagConfig, seed: int) -> tuple[list[dict], dict]:
    rows = []
    for lag in cfg.lags:
        row: dict = {"lag": lag}
        for kind in cfg.models:
            result = fit_long_lag(
                kind,
                lag,
                steps=cfg.steps,
                seed=seed,
                batch_size=cfg.batch_size,
                hidden_size=cfg.hidden_size,
                forget_bias=cfg.forget_bias,
            )
            row[kind] = round(result.accuracy, 4)
            row["chance"] = result.chance
        rows.append(row)
        log.info("long lag %d: %s", lag, row)
    largest = rows[-1]
    metrics = {
        f"accuracy_at_lag_{largest['lag']}": {k: largest[k] for k in cfg.models},
        "chance": largest["chance"],
        "steps": cfg.steps,
    }
    return rows, metrics


def clipping_experiment(
    cfg: ClippingConfig, train_ids: np.ndarray, vocab_size: int, seed: int, embedding_size: int = 64
) -> tuple[list[dict], dict]:
    runs = {}
    for name, clip in (("clipped", cfg.clip), ("unclipped", None)):
        torch.manual_seed(seed)
        model = _small_model(cfg.model, vocab_size, embedding_size, cfg.hidden_size, 0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        runs[name] = train_tbptt(model, train_ids, cfg.steps, cfg.batch_size, cfg.bptt, optimizer, clip)
    rows = []
    for step in range(cfg.steps):
        row = {"step": step}
        for name, log_rows in runs.items():
            if step < len(log_rows):
                norm, loss = log_rows[step]["grad_norm"], log_rows[step]["loss"]
                row[f"grad_norm_{name}"] = norm if math.isfinite(norm) else None
                row[f"loss_{name}"] = loss if math.isfinite(loss) else None
        rows.append(row)
    metrics = {"clip": cfg.clip, "lr": cfg.lr}
    for name, log_rows in runs.items():
        norms = np.array([r["grad_norm"] for r in log_rows])
        losses = np.array([r["loss"] for r in log_rows])
        finite = np.isfinite(norms) & np.isfinite(losses)
        metrics[name] = {
            "max_grad_norm": float(f"{np.max(norms[finite]):.4g}") if finite.any() else None,
            "median_grad_norm": float(f"{np.median(norms[finite]):.4g}") if finite.any() else None,
            "steps_over_clip": int(np.sum(norms[finite] > cfg.clip)),
            "final_loss": round(float(np.mean(losses[finite][-10:])), 4) if finite.any() else None,
            "diverged_at_step": None
            if finite.all() and len(log_rows) == cfg.steps
            else int(np.argmin(finite))
            if not finite.all()
            else len(log_rows),
        }
    return rows, metrics


# ------------------------------------------------------------------------------ pictures


def _plot(
    rows: list[dict],
    x: str,
    series: list[str],
    path: Path,
    title: str,
    ylabel: str,
    logy: bool = False,
    hline: float | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in series:
        pts = [(r[x], r[name]) for r in rows if r.get(name) is not None and (not logy or r[name] > 0)]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 15 else None, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", label="chance")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ stage


def run_study(
    cfg: StudyConfig,
    seed: int,
    prepared_dir: Path,
    plots_dir: Path,
    pictures_dir: Path,
    metrics_path: Path,
    tracker=None,
) -> dict:
    from rnnlab.data.vocab import Vocab

    corpus_dir = prepared_dir / cfg.corpus
    for name in ("train.npy", "valid.npy", "vocab.json"):
        if not (corpus_dir / name).is_file():
            raise ConfigError(f"study.corpus: {corpus_dir / name} is missing (run the prepare stage for {cfg.corpus})")
    if read_json(corpus_dir / "tokenizer.json").get("name") == "char":
        raise ConfigError(f"study.corpus: expected a word-level LM corpus, got the char corpus {cfg.corpus!r}")
    train_ids, valid_ids = np.load(corpus_dir / "train.npy"), np.load(corpus_dir / "valid.npy")
    vocab_size = len(Vocab.load(corpus_dir / "vocab.json"))
    metrics: dict = {}
    timings: dict = {}
    with single_threaded():  # tiny models: one intra-op thread is fastest, and kind to a shared CPU
        started = time.perf_counter()
        grad_rows, metrics["gradient_flow"] = gradient_flow_experiment(
            cfg.gradient_flow, train_ids, valid_ids, vocab_size, seed
        )
        timings["gradient_flow_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        lag_rows, metrics["long_lag"] = long_lag_experiment(cfg.long_lag, seed)
        timings["long_lag_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        clip_rows, metrics["clipping"] = clipping_experiment(
            cfg.clipping, train_ids, vocab_size, seed, cfg.gradient_flow.embedding_size
        )
        timings["clipping_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    order_table = ngram_orders.corpus_order_table(cfg.ngram_orders, prepared_dir)
    metrics["ngram_orders"] = ngram_orders.metrics(order_table)
    timings["ngram_orders_s"] = round(time.perf_counter() - started, 1)
    metrics["wall_s"] = timings
    plots = {
        "gradient_flow": plots_dir / "gradient_flow.json",
        "long_lag": plots_dir / "long_lag.json",
        "clipping": plots_dir / "clipping.json",
        "ngram_orders": plots_dir / "ngram_orders.json",
    }
    write_json(plots["gradient_flow"], grad_rows)
    write_json(plots["long_lag"], lag_rows)
    write_json(plots["clipping"], clip_rows)
    write_json(plots["ngram_orders"], ngram_orders.plot_rows(order_table))
    # The whole table next to the PNGs: data/study is what the evaluate stage reads for its report.
    order_table_path = pictures_dir / "ngram_orders.json"
    write_json(order_table_path, order_table)
    flow_series = [f"{m}_{p}" for m in cfg.gradient_flow.models for p in ("init", "trained")]
    pictures = [
        _plot(
            grad_rows,
            "lag",
            flow_series,
            pictures_dir / "gradient_flow.png",
            f"‖∂L_T/∂h_t‖ / ‖∂L_T/∂h_(T-1)‖ on PTB ({cfg.gradient_flow.train_steps} training steps)",
            "gradient norm relative to lag 1 (log)",
            logy=True,
        ),
        _plot(
            lag_rows,
            "lag",
            list(cfg.long_lag.models),
            pictures_dir / "long_lag.png",
            f"Recall after L distractors ({cfg.long_lag.steps} steps each)",
            "accuracy",
            hline=lag_rows[0]["chance"],
        ),
        _plot(
            clip_rows,
            "step",
            ["grad_norm_clipped", "grad_norm_unclipped"],
            pictures_dir / "clipping.png",
            f"{cfg.clipping.model} on PTB, SGD lr {cfg.clipping.lr}: pre-clip gradient norm",
            "‖g‖ (log)",
            logy=True,
        ),
    ]
    if order_table:
        pictures.append(ngram_orders.picture(order_table, pictures_dir / "ngram_orders.png"))
    write_json(metrics_path, metrics)
    if tracker is not None:
        flat = {}
        gf = metrics["gradient_flow"]
        for kind in cfg.gradient_flow.models:
            for phase in ("init", "trained"):
                for k, v in gf[kind][phase].items():
                    flat[f"gradient_flow/{kind}/{phase}/{k}"] = v
        for kind, acc in next(v for k, v in metrics["long_lag"].items() if k.startswith("accuracy_at")).items():
            flat[f"long_lag/{kind}/accuracy_at_largest_lag"] = acc
        for name in ("clipped", "unclipped"):
            for k, v in metrics["clipping"][name].items():
                if isinstance(v, (int, float)):
                    flat[f"clipping/{name}/{k}"] = v
        for corpus, t in order_table.items():
            for row in t["rows"]:
                for k in ngram_orders.NUMBERS:
                    flat[f"ngram_orders/{corpus}/order_{row['order']}/{k}"] = row[k]
        tracker.log_metrics(flat)
        for path in [*plots.values(), *pictures, order_table_path, metrics_path]:
            tracker.log_artifact(path, "study")
    log.info("study: %s", metrics)
    return metrics
