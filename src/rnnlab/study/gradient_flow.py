"""How far back does the error signal reach? ‖∂L_T / ∂h_t‖ as a function of the lag T - t.

For a window of T inputs, L_T is the loss of the prediction made after the *last* input,
and h_t the hidden state after input t (the top layer's ``h``; for an LSTM optionally the
cell ``c``). In a vanilla RNN, ∂h_{t+1}/∂h_t = diag(tanh') W, so the norm typically shrinks
geometrically with the lag (Bengio, Simard & Frasconi 1994); in an LSTM the cell path
∂c_{t+1}/∂c_t = diag(f) lets it survive while the forget gates stay open (Hochreiter &
Schmidhuber 1997).

Model-agnostic: the window is fed one token at a time through the model's own ``forward``
with the state carried, so the state returned after token t *is* h_t and autograd gives
∂L_T/∂h_t for any model of :data:`rnnlab.models.lm.LANGUAGE_MODELS` whose state holds a
hidden vector (``rnn``, ``lstm``, ``gru``, ``lstm_hand``, ``lstm_peephole``; not ``mlp``,
whose state is a token history). Tensors are time-first: a window is [T + 1, batch].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from rnnlab.errors import ConfigError


def _hidden_of(state, wrt: str) -> torch.Tensor:
    """The top layer's h (or c) from a model state: tensor [layers, batch, hidden] or (h, c)."""
    if isinstance(state, tuple):
        if wrt == "c":
            return state[1]
        return state[0]
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        if wrt == "c":
            raise ConfigError("wrt='c' needs an LSTM state (h, c); this model's state is a single tensor")
        return state
    raise ConfigError(
        f"gradient flow needs a recurrent model whose state is a hidden vector; got state of type "
        f"{type(state).__name__}{'' if not isinstance(state, torch.Tensor) else ' ' + str(state.dtype)}"
    )


def gradient_norm_by_lag(model: nn.Module, windows: Iterable[torch.Tensor], wrt: str = "h") -> np.ndarray:
    """Mean over windows and batch rows of ‖∂L_T / ∂h_{T-lag}‖ for lag = 0 .. T-1.

    windows: LongTensor [T + 1, batch] each: rows 0..T-1 are read, row T is the target of
    the last prediction (L_T, cross-entropy, summed over the batch so each row's gradient is
    its own). Every window starts from ``model.init_state``. Dropout is off while measuring.
    Returns float64 [T]; entry ``lag`` is the norm for h_t with t = T - 1 - lag. Entry 0 is
    NaN: the last state reaches the prediction through the model's output, not through a
    state passed on, so it is not an h_t this method can see (lag 1 is the first measured).
    """
    if wrt not in ("h", "c"):
        raise ConfigError(f"wrt must be 'h' or 'c', got {wrt!r}")
    was_training = model.training
    model.eval()
    totals: np.ndarray | None = None
    rows = 0
    try:
        for window in windows:
            if window.dim() != 2 or window.size(0) < 2:
                raise ConfigError(f"each window must be [T + 1, batch] with T >= 1, got {list(window.shape)}")
            norms = _window_gradient_norms(model, window, wrt)  # [T, batch]
            totals = norms.sum(1) if totals is None else totals + norms.sum(1)
            rows += norms.shape[1]
    finally:
        model.train(was_training)
    if totals is None:
        raise ConfigError("gradient_norm_by_lag got no windows")
    return totals / rows


def _window_gradient_norms(model: nn.Module, window: torch.Tensor, wrt: str) -> np.ndarray:
    seq_len, batch = window.size(0) - 1, window.size(1)
    device = next(model.parameters()).device
    window = window.to(device)
    # cuDNN RNNs refuse backward in eval mode; the native kernels compute the same function.
    with torch.backends.cudnn.flags(enabled=False), torch.enable_grad():
        state = model.init_state(batch, device)
        hidden_states = []
        for t in range(seq_len):
            logits, state = model(window[t : t + 1], state)  # logits: [1, batch, vocab]
            hidden_states.append(_hidden_of(state, wrt))  # [layers, batch, hidden]
        loss = nn.functional.cross_entropy(logits[0], window[seq_len], reduction="sum")
        grads = torch.autograd.grad(loss, hidden_states, allow_unused=True)
    norms = np.full((seq_len, batch), np.nan)
    for t, grad in enumerate(grads):
        if grad is not None:  # None: the returned state h_t fed no later step (the last one)
            norms[seq_len - 1 - t] = grad[-1].norm(dim=-1).double().cpu().numpy()  # top layer: [batch]
    return norms


def windows_from_stream(
    ids: np.ndarray | torch.Tensor, window_len: int, batch_size: int, num_windows: int, seed: int = 0
) -> list[torch.Tensor]:
    """``num_windows`` windows [window_len + 1, batch_size] cut at random offsets of an id stream."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    span = window_len + 1
    if ids.numel() < span:
        raise ConfigError(f"the stream has {ids.numel()} tokens, fewer than window_len + 1 = {span}")
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(num_windows):
        starts = torch.randint(0, ids.numel() - span + 1, (batch_size,), generator=generator)
        windows.append(torch.stack([ids[s : s + span] for s in starts.tolist()], dim=1))  # [span, batch]
    return windows


def decay_per_step(norms: np.ndarray, first_lag: int = 1, last_lag: int | None = None) -> float:
    """Geometric-mean factor by which the gradient norm shrinks per step of lag between
    ``first_lag`` and ``last_lag`` (1 = no decay, 0.5 = halves every step)."""
    last_lag = len(norms) - 1 if last_lag is None else last_lag
    if not 1 <= first_lag < last_lag < len(norms):
        raise ConfigError(f"need 1 <= first_lag < last_lag < {len(norms)}, got {first_lag}, {last_lag}")
    return float((norms[last_lag] / norms[first_lag]) ** (1.0 / (last_lag - first_lag)))
