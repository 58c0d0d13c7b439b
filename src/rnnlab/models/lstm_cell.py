"""A hand-written LSTM with optional peephole connections (time-first tensors).

Gates of one layer (Hochreiter & Schmidhuber 1997, forget gate Gers et al. 2000, peepholes
Gers & Schmidhuber 2000 / Gers, Schraudolph & Schmidhuber 2002)::

    i(t) = sigmoid(W_i x(t) + R_i h(t-1) + p_i * c(t-1) + b_i)     input gate
    f(t) = sigmoid(W_f x(t) + R_f h(t-1) + p_f * c(t-1) + b_f)     forget gate
    g(t) = tanh   (W_g x(t) + R_g h(t-1)                + b_g)     cell input
    c(t) = f(t) * c(t-1) + i(t) * g(t)                             cell state (the "carousel")
    o(t) = sigmoid(W_o x(t) + R_o h(t-1) + p_o * c(t)   + b_o)     output gate sees the NEW cell
    h(t) = o(t) * tanh(c(t))

``p_i, p_f, p_o`` are the peephole weights: vectors, i.e. diagonal matrices, so each gate
sees only its own cell. Without peepholes this is exactly ``nn.LSTM``.

Speed: the four gates' input weights are one ``[4h, in]`` matrix applied to the whole window
in a single matmul before the time loop; inside the loop one ``[4h, h]`` matmul per step
gives all recurrent gate pre-activations, and the backward pass (BPTT) is written out by
hand (:class:`LSTMWindowFunction`) instead of recorded step by step by autograd.
:func:`lstm_cell` / :func:`lstm_layer_autograd` are the readable one-step version and the
autograd reference it is tested against. Parameters use ``nn.LSTM``'s layout and gate order
(i, f, g, o), except that its two biases ``b_ih + b_hh`` are one ``bias`` here, so weights
copy across directly.

State: ``(h, c)``, each [num_layers, batch, hidden], as ``nn.LSTM``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def lstm_cell(
    gates_x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    weight_hh: torch.Tensor,
    peephole: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step.

    gates_x: [batch, 4h], the input part ``W x(t) + b`` of all four gates; h, c: [batch, h];
    weight_hh: [4h, h]; peephole: [3, h] rows (p_i, p_f, p_o) or None.
    Returns (h(t), c(t)), each [batch, h].
    """
    gates = torch.addmm(gates_x, h, weight_hh.t())  # [batch, 4h]
    i, f, g, o = gates.chunk(4, dim=1)  # each [batch, h]
    if peephole is not None:
        i = i + peephole[0] * c
        f = f + peephole[1] * c
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if peephole is not None:
        o = o + peephole[2] * c_new
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


class LSTMWindowFunction(torch.autograd.Function):
    """Forward and backpropagation through time of one LSTM layer over a window, by hand.

    Same function as unrolling :func:`lstm_cell` under autograd, but the backward pass is the
    explicit BPTT recursion (one ``[4h, h]`` matmul and a few element-wise ops per step, the
    gates' local derivatives precomputed for the whole window), about 1.2x faster on CPU
    than letting autograd walk ~20 graph nodes per step. Tested against autograd, ``nn.LSTM``
    and finite differences (``gradcheck``).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, gates_x, h0, c0, weight_hh, peephole):
        # gates_x: [seq, batch, 4h] = W x(t) + b; h0, c0: [batch, h]; weight_hh: [4h, h]; peephole: [3, h] | None
        seq_len, batch, four_h = gates_x.shape
        hid = four_h // 4
        w_hh_t = weight_hh.t()
        acts = torch.empty_like(gates_x)  # gate values after their nonlinearity, order i f g o
        hs = gates_x.new_empty(seq_len + 1, batch, hid)  # h(0..seq)
        cs = gates_x.new_empty(seq_len + 1, batch, hid)  # c(0..seq)
        tanh_cs = gates_x.new_empty(seq_len, batch, hid)  # tanh(c(1..seq)), reused by backward
        hs[0], cs[0] = h0, c0
        for t in range(seq_len):
            gates = torch.addmm(gates_x[t], hs[t], w_hh_t)  # [batch, 4h]
            act, c_prev = acts[t], cs[t]
            if peephole is not None:  # i and f see c(t-1)
                gates[:, : 2 * hid].view(batch, 2, hid).addcmul_(peephole[:2], c_prev.unsqueeze(1))
                torch.sigmoid(gates[:, : 2 * hid], out=act[:, : 2 * hid])
            else:  # one call for i, f (and o, its pre-activation is final too); g is overwritten below
                torch.sigmoid(gates, out=act)
            torch.tanh(gates[:, 2 * hid : 3 * hid], out=act[:, 2 * hid : 3 * hid])
            i, f, g = act[:, :hid], act[:, hid : 2 * hid], act[:, 2 * hid : 3 * hid]
            c = torch.addcmul(f * c_prev, i, g, out=cs[t + 1])  # c(t) = f c(t-1) + i g
            if peephole is not None:  # o sees the new c(t)
                torch.sigmoid(gates[:, 3 * hid :].addcmul_(peephole[2], c), out=act[:, 3 * hid :])
            torch.mul(act[:, 3 * hid :], torch.tanh(c, out=tanh_cs[t]), out=hs[t + 1])  # h(t) = o tanh(c(t))
        ctx.save_for_backward(acts, hs, cs, tanh_cs, weight_hh, peephole)
        return hs[1:], hs[seq_len].clone(), cs[seq_len].clone()

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, grad_h_last, grad_c_last):
        acts, hs, cs, tanh_cs, weight_hh, peephole = ctx.saved_tensors
        seq_len, batch, four_h = acts.shape
        hid = four_h // 4
        i, f, g, o = acts.unflatten(-1, (4, hid)).unbind(2)  # each [seq, batch, h]
        # Local derivatives of every step at once; the loop below only chains them backwards.
        do_pre_dh = tanh_cs * o * (1 - o)  # d o_pre / d h(t)
        dc_dh = o * (1 - tanh_cs * tanh_cs)  # d c(t) / d h(t), within the step
        difg_pre_dc = torch.stack(
            [g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)], dim=2
        )  # [seq, batch, 3, h]
        grad_gates = torch.empty_like(acts)  # d L / d gate pre-activations: [seq, batch, 4h]
        grad_gates_4 = grad_gates.view(seq_len, batch, 4, hid)
        if grad_out is None:
            grad_out = torch.zeros_like(tanh_cs)
        dh = grad_out[-1] if grad_h_last is None else grad_out[-1] + grad_h_last  # dL/dh(t): [batch, h]
        dc = torch.zeros_like(dh) if grad_c_last is None else grad_c_last  # dL/dc(t): [batch, h]
        for t in range(seq_len - 1, -1, -1):
            torch.mul(dh, do_pre_dh[t], out=grad_gates_4[t, :, 3])
            dc = torch.addcmul(dc, dh, dc_dh[t])
            if peephole is not None:
                dc.addcmul_(grad_gates_4[t, :, 3], peephole[2])
            torch.mul(dc.unsqueeze(1), difg_pre_dc[t], out=grad_gates_4[t, :, :3])
            dc = dc * f[t]  # the constant error carousel: dc(t-1) = f(t) dc(t) (+ peephole paths)
            if peephole is not None:
                dc.add_((grad_gates_4[t, :, :2] * peephole[:2]).sum(1))
            dh = torch.mm(grad_gates[t], weight_hh)  # through W h(t-1)
            if t > 0:
                dh += grad_out[t - 1]
        grad_w_hh = grad_gates.reshape(-1, four_h).t() @ hs[:-1].reshape(-1, hid)  # sum_t dgates(t)^T h(t-1)
        grad_peephole = None
        if peephole is not None:
            grad_peephole = torch.stack(
                [
                    (grad_gates_4[:, :, 0] * cs[:-1]).sum((0, 1)),
                    (grad_gates_4[:, :, 1] * cs[:-1]).sum((0, 1)),
                    (grad_gates_4[:, :, 3] * cs[1:]).sum((0, 1)),
                ]
            )
        return grad_gates, dh, dc, grad_w_hh, grad_peephole


def lstm_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor,
    peephole: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One LSTM layer over a window: the input projection of every step in one matmul, then
    :class:`LSTMWindowFunction` for the recurrence.

    x: [seq, batch, in]; h0, c0: [batch, h]; weight_ih: [4h, in]; weight_hh: [4h, h]; bias: [4h].
    Returns (h(1..seq) [seq, batch, h], (h(seq), c(seq))).
    """
    seq_len, batch = x.size(0), x.size(1)
    gates_x = torch.addmm(bias, x.reshape(seq_len * batch, -1), weight_ih.t()).view(seq_len, batch, -1)
    outputs, h, c = LSTMWindowFunction.apply(gates_x, h0, c0, weight_hh, peephole)
    return outputs, (h, c)


def lstm_layer_autograd(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor,
    peephole: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The same layer as :func:`lstm_layer`, unrolled over :func:`lstm_cell` and differentiated
    by autograd: the readable reference the hand-written BPTT is tested against."""
    seq_len, batch = x.size(0), x.size(1)
    gates_x = torch.addmm(bias, x.reshape(seq_len * batch, -1), weight_ih.t()).view(seq_len, batch, -1)
    h, c = h0, c0
    outputs = []
    # unbind, not gates_x[t]: indexing's backward would write a full-size zero tensor every step.
    for gates_x_t in gates_x.unbind(0):
        h, c = lstm_cell(gates_x_t, h, c, weight_hh, peephole)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


class HandLSTMLayer(nn.Module):
    """One LSTM layer (optionally with peepholes) over a window, via :func:`lstm_layer`."""

    def __init__(self, input_size: int, hidden_size: int, peepholes: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))  # [4h, in]
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))  # [4h, h]
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))  # [4h]
        self.peephole = nn.Parameter(torch.empty(3, hidden_size)) if peepholes else None  # [3, h]
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's init
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """x: [seq, batch, in], state (h0, c0) each [batch, h] ->
        (h for every step [seq, batch, h], (h_last, c_last))."""
        return lstm_layer(x, state[0], state[1], self.weight_ih, self.weight_hh, self.bias, self.peephole)

    @torch.no_grad()
    def copy_from_torch_lstm(self, lstm: nn.LSTM, layer: int = 0) -> None:
        """Load layer ``layer`` of an ``nn.LSTM`` (its two biases summed); peepholes set to 0."""
        self.weight_ih.copy_(getattr(lstm, f"weight_ih_l{layer}"))
        self.weight_hh.copy_(getattr(lstm, f"weight_hh_l{layer}"))
        self.bias.copy_(getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}"))
        if self.peephole is not None:
            self.peephole.zero_()


class HandLSTM(nn.Module):
    """The recurrent core ``rnn`` of the language model (:class:`rnnlab.models.lm.RecurrentLanguageModel`):
    stacked :class:`HandLSTMLayer` (with or without peepholes), dropout between them.

    ``forward(x [seq, batch, in], (h0, c0) each [num_layers, batch, hidden]) -> (h [seq, batch, hidden],
    (h_last, c_last))``, the call signature of ``nn.LSTM``, so the two swap in the shell.
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0, peepholes: bool = True
    ):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = nn.ModuleList(
            HandLSTMLayer(input_size if i == 0 else hidden_size, hidden_size, peepholes) for i in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h0, c0 = state  # each [num_layers, batch, hidden]
        h_last, c_last = [], []
        for i, layer in enumerate(self.layers):
            x, (h, c) = layer(x, (h0[i], c0[i]))  # x: [seq, batch, hidden]
            if i < self.num_layers - 1:
                x = self.drop(x)  # nn.LSTM's inter-layer dropout
            h_last.append(h)
            c_last.append(c)
        return x, (torch.stack(h_last), torch.stack(c_last))

    @torch.no_grad()
    def copy_from_torch_lstm(self, lstm: nn.LSTM) -> None:
        for i, layer in enumerate(self.layers):
            layer.copy_from_torch_lstm(lstm, i)
