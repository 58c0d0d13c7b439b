"""Synthetic long-lag recall: remember the first symbol through L distractors (time-first).

A sequence is ``[s, d_1, ..., d_L, ?]``: one of ``num_symbols`` answer symbols, L random
distractor tokens, then a query marker; the model must output ``s`` at the query. Nothing
in the distractors carries information about ``s``, so above-chance accuracy (chance =
1 / num_symbols) means the model stored ``s`` for L+1 steps, the situation in which a
vanilla RNN's gradient vanishes (Bengio, Simard & Frasconi 1994; Hochreiter &
Schmidhuber 1997).

Vocabulary: ids ``0..num_symbols-1`` answers, then ``num_distractors`` distractors, then the
query marker. Models come from :data:`rnnlab.models.lm.LANGUAGE_MODELS`; only the logits at
the query position are trained and scored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.lm import build_language_model


@dataclass(frozen=True)
class LongLagTask:
    lag: int
    num_symbols: int = 4
    num_distractors: int = 8

    def __post_init__(self):
        if self.lag < 0:
            raise ConfigError(f"lag must be >= 0, got {self.lag}")
        if self.num_symbols < 2 or self.num_distractors < 1:
            raise ConfigError(
                f"num_symbols must be >= 2 and num_distractors >= 1, got {self.num_symbols}, {self.num_distractors}"
            )

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + self.num_distractors + 1

    @property
    def query_id(self) -> int:
        return self.num_symbols + self.num_distractors

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [lag + 2, batch] int64, answers [batch] int64)."""
        answers = torch.randint(0, self.num_symbols, (batch_size,), generator=generator)
        distractors = torch.randint(
            self.num_symbols, self.num_symbols + self.num_distractors, (self.lag, batch_size), generator=generator
        )
        query = torch.full((1, batch_size), self.query_id, dtype=torch.long)
        return torch.cat([answers.unsqueeze(0), distractors, query]), answers


@contextlib.contextmanager
def single_threaded():
    """Run torch ops on one intra-op thread, then restore the previous setting.

    The study's models are tiny (tens of units): splitting their ops over threads costs more
    than it saves, and on a CPU shared with other jobs it made training ~30x slower here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_forget_gate_bias(model: nn.Module, value: float) -> int:
    """Initialise the forget-gate bias of every LSTM layer of ``model`` to ``value``; returns how
    many layers were changed (0 for models without LSTM layers).

    A positive forget bias starts the cell as a near-perfect memory (f = sigmoid(1) = 0.73
    instead of 0.5), the initialisation recommended by Gers, Schmidhuber & Cummins (2000) and
    Jozefowicz et al. (2015); with f = 0.5 the error carried by the cell halves every step.
    """
    from rnnlab.models.lstm_cell import HandLSTMLayer

    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LSTM):
                hid = module.hidden_size
                for layer in range(module.num_layers):
                    getattr(module, f"bias_ih_l{layer}")[hid : 2 * hid] = value
                    getattr(module, f"bias_hh_l{layer}")[hid : 2 * hid] = 0.0
                    changed += 1
            elif isinstance(module, HandLSTMLayer):
                module.bias[module.hidden_size : 2 * module.hidden_size] = value
                changed += 1
    return changed


@dataclass
class LongLagResult:
    model_kind: str
    lag: int
    accuracy: float
    chance: float
    final_train_loss: float
    model: nn.Module


def fit_long_lag(
    model_kind: str,
    lag: int,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 32,
    hidden_size: int = 32,
    learning_rate: float = 3e-3,
    clip_grad_norm: float = 1.0,
    forget_bias: float = 3.0,
    embedding_std: float = 1.0,
    eval_size: int = 1000,
    task: LongLagTask | None = None,
) -> LongLagResult:
    """Train ``model_kind`` (a LANGUAGE_MODELS name) on the recall task with Adam for ``steps``
    batches of fresh sequences; accuracy on ``eval_size`` held-out sequences.

    Every kind gets the same budget (steps, batch, hidden size, optimiser, clipping);
    ``forget_bias`` initialises LSTM forget gates (see :func:`set_forget_gate_bias`).
    """
    with single_threaded():
        return _fit_long_lag(
            model_kind,
            lag,
            steps,
            seed,
            batch_size,
            hidden_size,
            learning_rate,
            clip_grad_norm,
            forget_bias,
            embedding_std,
            eval_size,
            task,
        )


def _fit_long_lag(
    model_kind,
    lag,
    steps,
    seed,
    batch_size,
    hidden_size,
    learning_rate,
    clip_grad_norm,
    forget_bias,
    embedding_std,
    eval_size,
    task,
) -> LongLagResult:
    task = task or LongLagTask(lag)
    if task.lag != lag:
        raise ConfigError(f"task.lag {task.lag} differs from lag {lag}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    torch.manual_seed(seed)
    model = build_language_model(
        model_kind, task.vocab_size, embedding_size=hidden_size, hidden_size=hidden_size, num_layers=1, dropout=0.0
    )
    set_forget_gate_bias(model, forget_bias)
    # The LMs' +-0.1 embedding init makes the one symbol that matters a faint input; unit
    # variance (like a one-hot input with unit weights) makes it as loud as the distractors.
    nn.init.normal_(model.embedding.weight, std=embedding_std)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    train_gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        tokens, answers = task.batch(batch_size, train_gen)
        logits, _ = model(tokens, model.init_state(batch_size))
        loss = nn.functional.cross_entropy(logits[-1], answers)  # logits[-1]: [batch, vocab] at the query
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
    model.eval()
    eval_gen = torch.Generator().manual_seed(10_000 + seed)  # disjoint stream from training
    tokens, answers = task.batch(eval_size, eval_gen)
    with torch.no_grad():
        logits, _ = model(tokens, model.init_state(eval_size))
    accuracy = (logits[-1].argmax(-1) == answers).float().mean().item()
    return LongLagResult(model_kind, lag, accuracy, 1.0 / task.num_symbols, float(loss.item()), model)


def train_long_lag(model_kind: str, lag: int, steps: int = 600, seed: int = 0, **kwargs) -> float:
    """Accuracy of ``model_kind`` on the lag-``lag`` recall task after ``steps`` training batches."""
    return fit_long_lag(model_kind, lag, steps, seed, **kwargs).accuracy
