"""Pieces every language model shares: hyper-parameter checks, the embedding/output init and
tying, state detaching at BPTT window boundaries, parameter counting."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnlab.errors import ConfigError

INIT_RANGE = 0.1  # pytorch/examples' uniform init, so results compare with its reference numbers
OUTPUT_LAYERS = ("full", "adaptive")  # the recurrent LMs' output layer (rnnlab.models.lm)


def check_lm_hparams(embedding_size: int, hidden_size: int, num_layers: int, dropout: float, tie_weights: bool):
    """Range checks shared by every LM; errors name the offending key."""
    for key, value in (("embedding_size", embedding_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if tie_weights and embedding_size != hidden_size:
        raise ConfigError(f"tie_weights needs embedding_size == hidden_size, got {embedding_size} and {hidden_size}")


def check_adaptive_output(vocab_size: int, cutoffs: list[int] | None, tie_weights: bool) -> list[int]:
    """The adaptive softmax's cutoffs: increasing ids in [1, vocab_size - 1]; no weight tying
    (the head and the tail projections have no single vocab x hidden matrix to share)."""
    if tie_weights:
        raise ConfigError("tie_weights needs output: full (the adaptive output has no single V to tie)")
    ok = (
        isinstance(cutoffs, (list, tuple))
        and len(cutoffs) >= 1
        and all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs)
        and list(cutoffs) == sorted(set(cutoffs))
        and 0 < cutoffs[0]
        and cutoffs[-1] <= vocab_size - 1
    )
    if not ok:
        raise ConfigError(
            f"cutoffs: expected increasing integers in [1, vocab size - 1 = {vocab_size - 1}] "
            f"(the frequency ranks where the head and each tail cluster end), got {cutoffs!r}"
        )
    return list(cutoffs)


def init_output_layer(embedding: nn.Embedding, output: nn.Linear, tie_weights: bool) -> None:
    """Uniform embedding, zero output bias, uniform output weight (or the embedding's, tied:
    Press & Wolf 2017 / Inan et al. 2017)."""
    nn.init.uniform_(embedding.weight, -INIT_RANGE, INIT_RANGE)
    nn.init.zeros_(output.bias)
    if tie_weights:
        output.weight = embedding.weight
    else:
        nn.init.uniform_(output.weight, -INIT_RANGE, INIT_RANGE)


def detach_state(state: Any) -> Any:
    """Cut the autograd graph at a BPTT window boundary while keeping the values (truncated BPTT)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    raise TypeError(f"cannot detach state of type {type(state).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
