"""Hand-written language models: equal to the torch library versions, correct gradients,
streaming state that makes window boundaries invisible."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.lm import LANGUAGE_MODELS, RecurrentLanguageModel, build_language_model
from rnnlab.models.lm_parts import count_parameters, detach_state
from rnnlab.models.lstm_cell import (
    HandLSTMLayer,
    lstm_cell,
    lstm_layer,
    lstm_layer_autograd,
)
from rnnlab.models.mlp_lm import MLPLanguageModel
from rnnlab.models.rnn import ElmanRNNLayer, elman_rnn_layer
from rnnlab.study.long_lag import single_threaded

VOCAB = 23
ATOL = 1e-5


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _run_lm(model, tokens, targets, state):
    logits, new_state = model(tokens, state)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    # Also push a gradient through the final state, so the state's backward path is checked too.
    h = new_state[0] if isinstance(new_state, tuple) else new_state
    (loss + 0.3 * h.pow(2).sum()).backward()
    return logits, new_state


# ---------------------------------------------------------------- vanilla RNN == nn.RNN


def test_elman_rnn_matches_torch_rnn_outputs_and_gradients():
    torch.manual_seed(0)
    seq, batch, emb, hidden, layers = 7, 3, 5, 6, 2
    model = RecurrentLanguageModel(
        VOCAB, core="rnn", embedding_size=emb, hidden_size=hidden, num_layers=layers, dropout=0.0
    )
    ref_rnn = nn.RNN(emb, hidden, layers, nonlinearity="tanh")
    ref_emb = nn.Embedding(VOCAB, emb)
    with torch.no_grad():
        ref_emb.weight.copy_(model.embedding.weight)
        for i, layer in enumerate(model.layers):
            getattr(ref_rnn, f"weight_ih_l{i}").copy_(layer.U)
            getattr(ref_rnn, f"weight_hh_l{i}").copy_(layer.W)
            # nn.RNN has two biases that are only ever added; split b between them.
            getattr(ref_rnn, f"bias_ih_l{i}").copy_(0.25 * layer.b)
            getattr(ref_rnn, f"bias_hh_l{i}").copy_(0.75 * layer.b)
        model.c.copy_(torch.randn(VOCAB))
    tokens = torch.randint(0, VOCAB, (seq, batch))
    targets = torch.randint(0, VOCAB, (seq, batch))
    state = torch.randn(layers, batch, hidden)

    logits, new_state = _run_lm(model, tokens, targets, state)

    ref_out, ref_state = ref_rnn(ref_emb(tokens), state)
    ref_logits = ref_out @ model.V.detach().t() + model.c.detach()
    assert torch.allclose(logits, ref_logits, atol=ATOL)
    assert torch.allclose(new_state, ref_state, atol=ATOL)
    ref_loss = nn.functional.cross_entropy(ref_logits.reshape(-1, VOCAB), targets.reshape(-1))
    (ref_loss + 0.3 * ref_state.pow(2).sum()).backward()

    assert torch.allclose(model.embedding.weight.grad, ref_emb.weight.grad, atol=ATOL)
    for i, layer in enumerate(model.layers):
        assert torch.allclose(layer.U.grad, getattr(ref_rnn, f"weight_ih_l{i}").grad, atol=ATOL)
        assert torch.allclose(layer.W.grad, getattr(ref_rnn, f"weight_hh_l{i}").grad, atol=ATOL)
        assert torch.allclose(layer.b.grad, getattr(ref_rnn, f"bias_ih_l{i}").grad, atol=ATOL)
    assert layer.W.grad.abs().sum() > 0  # the comparison above was not between two zeros


def test_elman_rnn_uses_the_lecture_parameter_names_and_shapes():
    model = RecurrentLanguageModel(VOCAB, core="rnn", embedding_size=5, hidden_size=6, num_layers=1, dropout=0.0)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embedding.weight": (VOCAB, 5),
        "rnn.layers.0.U": (6, 5),  # p x d
        "rnn.layers.0.W": (6, 6),  # p x p
        "rnn.layers.0.b": (6,),
        "decoder.weight": (VOCAB, 6),  # V: q x p (the shell's output layer)
        "decoder.bias": (VOCAB,),  # c
    }
    assert model.V.shape == (VOCAB, 6) and model.c.shape == (VOCAB,)
    tied = RecurrentLanguageModel(
        VOCAB, core="rnn", embedding_size=6, hidden_size=6, num_layers=1, dropout=0.0, tie_weights=True
    )
    assert tied.V is tied.embedding.weight
    # embedding (= V) + U + W + b + c, the tied matrix counted once
    assert count_parameters(tied) == VOCAB * 6 + 6 * 6 + 6 * 6 + 6 + VOCAB


def test_gradcheck_elman_layer_float64():
    torch.manual_seed(1)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    layer = ElmanRNNLayer(3, 4).double()
    params = [p.detach().clone().requires_grad_(True) for p in (layer.U, layer.W, layer.b)]
    # d(outputs, h_last) / d(x, h0, U, W, b) over a 5-step window: BPTT checked by finite differences.
    assert torch.autograd.gradcheck(elman_rnn_layer, (x, h0, *params), eps=1e-6, atol=1e-6)
    assert torch.equal(layer(x, h0)[0], elman_rnn_layer(x, h0, layer.U, layer.W, layer.b)[0])


# ---------------------------------------------------------------- hand LSTM == nn.LSTM


def test_hand_lstm_without_peepholes_matches_torch_lstm_outputs_and_gradients():
    torch.manual_seed(0)
    seq, batch, emb, hidden, layers = 6, 3, 5, 4, 2
    ref = RecurrentLanguageModel(
        VOCAB, core="lstm", embedding_size=emb, hidden_size=hidden, num_layers=layers, dropout=0.0
    )
    hand = RecurrentLanguageModel(
        VOCAB, core="lstm_hand", embedding_size=emb, hidden_size=hidden, num_layers=layers, dropout=0.0
    )
    with torch.no_grad():
        hand.embedding.weight.copy_(ref.embedding.weight)
        hand.decoder.weight.copy_(ref.decoder.weight)
        ref.decoder.bias.normal_()
        hand.decoder.bias.copy_(ref.decoder.bias)
        hand.copy_from_torch_lstm(ref.rnn)
    tokens = torch.randint(0, VOCAB, (seq, batch))
    targets = torch.randint(0, VOCAB, (seq, batch))
    state = (torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden))

    logits, (h, c) = _run_lm(hand, tokens, targets, state)
    ref_logits, (ref_h, ref_c) = _run_lm(ref, tokens, targets, state)

    assert torch.allclose(logits, ref_logits, atol=ATOL)
    assert torch.allclose(h, ref_h, atol=ATOL) and torch.allclose(c, ref_c, atol=ATOL)
    assert torch.allclose(hand.embedding.weight.grad, ref.embedding.weight.grad, atol=ATOL)
    assert torch.allclose(hand.decoder.weight.grad, ref.decoder.weight.grad, atol=ATOL)
    for i, layer in enumerate(hand.layers):
        assert torch.allclose(layer.weight_ih.grad, getattr(ref.rnn, f"weight_ih_l{i}").grad, atol=ATOL)
        assert torch.allclose(layer.weight_hh.grad, getattr(ref.rnn, f"weight_hh_l{i}").grad, atol=ATOL)
        # d loss / d bias is the same for nn.LSTM's two summed biases and for our single one.
        assert torch.allclose(layer.bias.grad, getattr(ref.rnn, f"bias_hh_l{i}").grad, atol=ATOL)
    assert hand.layers[0].weight_hh.grad.abs().sum() > 0


def _naive_peephole_step(x, h, c, Wx, Wh, b, p):
    """The gate equations written one gate at a time, straight from the module docstring."""
    Wxi, Wxf, Wxg, Wxo = Wx.chunk(4)
    Whi, Whf, Whg, Who = Wh.chunk(4)
    bi, bf, bg, bo = b.chunk(4)
    i = torch.sigmoid(x @ Wxi.T + h @ Whi.T + p[0] * c + bi)
    f = torch.sigmoid(x @ Wxf.T + h @ Whf.T + p[1] * c + bf)
    g = torch.tanh(x @ Wxg.T + h @ Whg.T + bg)
    c_new = f * c + i * g
    o = torch.sigmoid(x @ Wxo.T + h @ Who.T + p[2] * c_new + bo)  # the output gate sees c(t)
    return o * torch.tanh(c_new), c_new


def test_peephole_layer_matches_the_gate_equations():
    torch.manual_seed(2)
    layer = HandLSTMLayer(3, 4, peepholes=True)
    with torch.no_grad():
        layer.peephole.uniform_(-2, 2)  # large enough that forgetting them would show
    x = torch.randn(5, 2, 3)
    h, c = torch.randn(2, 4), torch.randn(2, 4)
    out, (h_last, c_last) = layer(x, (h, c))
    for t in range(5):
        h, c = _naive_peephole_step(x[t], h, c, layer.weight_ih, layer.weight_hh, layer.bias, layer.peephole)
        assert torch.allclose(out[t], h, atol=ATOL)
    assert torch.allclose(c_last, c, atol=ATOL)
    no_peep = HandLSTMLayer(3, 4, peepholes=False)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias"):
            getattr(no_peep, name).copy_(getattr(layer, name))
    assert (
        no_peep(x, (torch.zeros(2, 4), torch.ones(2, 4)))[0] - layer(x, (torch.zeros(2, 4), torch.ones(2, 4)))[0]
    ).abs().max() > 1e-2


def test_gradcheck_peephole_lstm_cell_and_layer_float64():
    torch.manual_seed(3)
    batch, inp, hid = 2, 3, 4
    gates_x = torch.randn(batch, 4 * hid, dtype=torch.float64, requires_grad=True)
    h = torch.randn(batch, hid, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, hid, dtype=torch.float64, requires_grad=True)
    w_hh = (0.5 * torch.randn(4 * hid, hid, dtype=torch.float64)).requires_grad_(True)
    peep = torch.randn(3, hid, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lstm_cell, (gates_x, h, c, w_hh, peep), eps=1e-6, atol=1e-6)

    # Through a 4-step window, wrt the inputs and every parameter (peepholes on), for the
    # hand-written BPTT (lstm_layer) and for the autograd unroll it replaces.
    layer = HandLSTMLayer(inp, hid, peepholes=True).double()
    x = torch.randn(4, batch, inp, dtype=torch.float64, requires_grad=True)
    params = [
        p.detach().clone().requires_grad_(True) for p in (layer.weight_ih, layer.weight_hh, layer.bias, layer.peephole)
    ]
    for layer_fn in (lstm_layer, lstm_layer_autograd):

        def window(x, h, c, w_ih, w_hh, bias, peep, layer_fn=layer_fn):
            out, (h_last, c_last) = layer_fn(x, h, c, w_ih, w_hh, bias, peep)
            return out, h_last, c_last

        assert torch.autograd.gradcheck(window, (x, h, c, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("peepholes", [False, True])
def test_hand_bptt_equals_autograd_through_the_cell(peepholes):
    """The fast layer's hand-written backward == autograd through the readable lstm_cell, float32."""
    torch.manual_seed(7)
    seq, batch, inp, hid = 12, 5, 7, 9
    layer = HandLSTMLayer(inp, hid, peepholes=peepholes)
    params = [p for p in (layer.weight_ih, layer.weight_hh, layer.bias, layer.peephole) if p is not None]
    x = torch.randn(seq, batch, inp, requires_grad=True)
    h0, c0 = torch.randn(batch, hid, requires_grad=True), torch.randn(batch, hid, requires_grad=True)
    weights = [torch.randn(seq, batch, hid), torch.randn(batch, hid), torch.randn(batch, hid)]
    results = []
    for layer_fn in (lstm_layer, lstm_layer_autograd):
        out, (h, c) = layer_fn(x, h0, c0, layer.weight_ih, layer.weight_hh, layer.bias, layer.peephole)
        loss = sum((t * w).sum() for t, w in zip((out, h, c), weights))
        results.append([out, h, c, *torch.autograd.grad(loss, [x, h0, c0, *params])])
    for fast, reference in zip(*results):
        assert torch.allclose(fast, reference, atol=ATOL)


# ---------------------------------------------------------------- MLP LM


def test_mlp_predicts_from_exactly_its_n_minus_1_predecessors():
    torch.manual_seed(4)
    ctx = 3
    model = MLPLanguageModel(
        VOCAB, embedding_size=4, hidden_size=8, context_size=ctx, dropout=0.0, direct_connections=True
    ).eval()
    with torch.no_grad():
        model.direct.weight.normal_()
    tokens = torch.randint(4, VOCAB, (10, 2))
    logits, _ = model(tokens)
    t = 6
    changed = tokens.clone()
    changed[t - ctx, 0] = (tokens[t - ctx, 0] + 1) % VOCAB  # just outside position t's context
    assert torch.allclose(model(changed)[0][t], logits[t])
    changed[t - ctx + 1, 0] = (tokens[t - ctx + 1, 0] + 1) % VOCAB  # the oldest token inside it
    assert not torch.allclose(model(changed)[0][t, 0], logits[t, 0])
    assert torch.allclose(model(changed)[0][t, 1], logits[t, 1])  # the other stream is untouched
    # At stream start the missing history is <eos> (id 3).
    with_eos = torch.cat([torch.full((ctx, 2), 3), tokens])
    assert torch.allclose(model(with_eos)[0][ctx:], logits, atol=1e-6)


def test_mlp_rejects_bad_context_size():
    with pytest.raises(ConfigError, match="context_size"):
        MLPLanguageModel(VOCAB, embedding_size=4, hidden_size=4, dropout=0.0, context_size=0)


# ---------------------------------------------------------------- every registry model


NEW_MODELS = ["rnn", "lstm_hand", "lstm_peephole", "mlp"]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_registry_models_carry_state_across_windows(name):
    """Reading a stream in two windows with the carried state == reading it in one."""
    torch.manual_seed(5)
    model = build_language_model(
        name, VOCAB, embedding_size=8, hidden_size=8, num_layers=1 if name == "mlp" else 2, dropout=0.3
    ).eval()
    assert model.hparams["vocab_size"] == VOCAB
    rebuilt = build_language_model(name, **model.hparams)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (9, 3))
    with torch.no_grad():
        whole, _ = model(tokens, model.init_state(3))
        first, state = model(tokens[:4], model.init_state(3))
        second, _ = model(tokens[4:], detach_state(state))
    assert whole.shape == (9, 3, VOCAB)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-6)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_registry_models_overfit_one_batch(name):
    torch.manual_seed(6)
    model = build_language_model(name, VOCAB, embedding_size=16, hidden_size=32, num_layers=1, dropout=0.0)
    tokens = torch.randint(0, VOCAB, (8, 4))
    targets = torch.roll(tokens, -1, dims=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with single_threaded():  # tiny tensors: threads only add overhead (a lot on a busy CPU)
        for _ in range(80):
            logits, _ = model(tokens)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    # Uniform guessing is ln(23) = 3.14; memorising 32 next tokens takes it near zero.
    assert loss.item() < 0.3


@pytest.mark.parametrize("name", NEW_MODELS)
def test_bad_hparams_name_the_key(name):
    with pytest.raises(ConfigError, match="dropout"):
        build_language_model(name, VOCAB, embedding_size=4, hidden_size=4, num_layers=1, dropout=-0.1)
    with pytest.raises(ConfigError, match="hidden_size"):
        build_language_model(name, VOCAB, embedding_size=4, hidden_size=0, num_layers=1, dropout=0.0)


def test_model_sizes_have_no_defaults_of_their_own():
    """The run config (rnnlab.tasks.lm.RunConfig) is the one place of every default: a model built
    without its sizes is an error, not a silent second default."""
    with pytest.raises(TypeError, match="hidden_size"):
        build_language_model("lstm", VOCAB, embedding_size=4, num_layers=1, dropout=0.0)
    with pytest.raises(TypeError, match="embedding_size"):
        build_language_model("mlp", VOCAB, hidden_size=4, dropout=0.0)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        build_language_model("transformer", VOCAB)
    for name in NEW_MODELS + ["lstm", "gru"]:
        assert name in str(err.value)
    assert set(NEW_MODELS) <= set(LANGUAGE_MODELS)


def test_peephole_model_has_three_diagonal_weight_vectors_per_layer():
    peep = RecurrentLanguageModel(
        VOCAB, core="lstm_peephole", embedding_size=5, hidden_size=6, num_layers=2, dropout=0.0
    )
    hand = RecurrentLanguageModel(VOCAB, core="lstm_hand", embedding_size=5, hidden_size=6, num_layers=2, dropout=0.0)
    assert count_parameters(peep) - count_parameters(hand) == 2 * 3 * 6
    assert peep.hparams["core"] == "lstm_peephole" and hand.hparams["core"] == "lstm_hand"
    assert all(layer.peephole is not None for layer in peep.layers)
    assert all(layer.peephole is None for layer in hand.layers)


@pytest.mark.parametrize("core", ["lstm", "gru", "rnn", "lstm_hand", "lstm_peephole"])
def test_one_shell_for_every_recurrent_core(core):
    """Embedding, dropout, output layer, tying and init are the shell's: the same for every core."""
    torch.manual_seed(0)
    tied = build_language_model(
        core, VOCAB, embedding_size=8, hidden_size=8, num_layers=2, dropout=0.2, tie_weights=True
    )
    assert isinstance(tied, RecurrentLanguageModel) and tied.decoder.weight is tied.embedding.weight
    assert tied.V is tied.decoder.weight and tied.c is tied.decoder.bias
    assert float(tied.c.detach().abs().sum()) == 0.0 and float(tied.embedding.weight.detach().abs().max()) <= 0.1
    with pytest.raises(ConfigError, match="tie_weights needs embedding_size == hidden_size"):
        build_language_model(core, VOCAB, embedding_size=8, hidden_size=6, num_layers=1, dropout=0.0, tie_weights=True)
