"""Pieces every language model shares: hyper-parameter checks, the embedding/output init and
tying, state detaching at BPTT window boundaries, parameter counting."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnlab.errors import ConfigError

INIT_RANGE = 0.1  # pytorch/examples' uniform init, so results compare with its reference numbers


def check_lm_hparams(embedding_size: int, hidden_size: int, num_layers: int, dropout: float, tie_weights: bool):
    """Range checks shared by every LM; errors name the offending key."""
    for key, value in (("embedding_size", embedding_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if tie_weights and embedding_size != hidden_size:
        raise ConfigError(f"tie_weights needs embedding_size == hidden_size, got {embedding_size} and {hidden_size}")


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
