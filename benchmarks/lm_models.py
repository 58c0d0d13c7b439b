"""Training throughput (tokens/s) of every language-model type at one configuration.

    .venv/bin/python benchmarks/lm_models.py [--batch-size 20 --bptt 35 --hidden-size 200 ...]

One training step = forward over a [bptt, batch] window with the carried (detached) state,
cross-entropy, backward, gradient clipping, SGD update: what the LM task does per batch.
Models are timed in interleaved rounds and each keeps its best round, so a burst of load
from other processes on a shared CPU hurts every model alike and is mostly filtered out.
Also prints the recurrent layer alone (hand-written LSTM layer vs ``nn.LSTM``, forward +
backward), where the difference between the implementations is not diluted by the
embedding and the vocabulary-sized output layer.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rnnlab.models.lm import build_language_model
from rnnlab.models.lm_parts import count_parameters, detach_state
from rnnlab.models.lstm_cell import lstm_layer

MODELS = ["rnn", "lstm", "lstm_hand", "lstm_peephole", "gru", "mlp"]


def make_train_step(name: str, args: argparse.Namespace):
    torch.manual_seed(0)
    hparams = dict(embedding_size=args.hidden_size, hidden_size=args.hidden_size, dropout=0.2)
    if name != "mlp":
        hparams["num_layers"] = args.num_layers
    model = build_language_model(name, args.vocab_size, **hparams)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, args.vocab_size, (args.bptt + 1, args.batch_size))
    state = [model.init_state(args.batch_size)]

    def step():
        logits, new_state = model(tokens[:-1], state[0])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab_size), tokens[1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        state[0] = detach_state(new_state)

    return step, count_parameters(model)


def make_layer_steps(args: argparse.Namespace):
    """Forward + backward of one recurrent layer alone: nn.LSTM vs the hand-written layer."""
    torch.manual_seed(0)
    hid = args.hidden_size
    ref = nn.LSTM(hid, hid)
    x = torch.randn(args.bptt, args.batch_size, hid, requires_grad=True)
    h0 = c0 = torch.zeros(args.batch_size, hid)
    w_ih = ref.weight_ih_l0.detach().clone().requires_grad_(True)
    w_hh = ref.weight_hh_l0.detach().clone().requires_grad_(True)
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach().clone().requires_grad_(True)
    peephole = torch.zeros(3, hid, requires_grad=True)

    def torch_lstm():
        ref(x)[0].sum().backward()

    def hand(peep):
        def run():
            lstm_layer(x, h0, c0, w_ih, w_hh, bias, peep)[0].sum().backward()

        return run

    return {"layer nn.LSTM": torch_lstm, "layer hand": hand(None), "layer hand+peephole": hand(peephole)}


def best_seconds(steps: dict, rounds: int, reps: int) -> dict[str, float]:
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()  # warm-up / caches
            start = time.perf_counter()
            for _ in range(reps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--hidden-size", type=int, default=200)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")

    steps, params = {}, {}
    for name in names:
        steps[name], params[name] = make_train_step(name, args)
    tokens_per_step = args.batch_size * args.bptt
    print(
        f"training step: batch {args.batch_size} x bptt {args.bptt}, hidden/embedding {args.hidden_size}, "
        f"{args.num_layers} layers (mlp: 1), vocab {args.vocab_size}, {torch.get_num_threads()} threads, "
        f"best of {args.rounds} rounds x {args.reps} steps"
    )
    best = best_seconds(steps, args.rounds, args.reps)
    print(f"{'model':<16}{'params':>12}{'ms/step':>10}{'tokens/s':>11}")
    for name in names:
        print(f"{name:<16}{params[name]:>12,}{best[name] * 1e3:>10.1f}{tokens_per_step / best[name]:>11,.0f}")
    if "lstm" in best:
        for name in ("lstm_hand", "lstm_peephole"):
            if name in best:
                print(f"speed ratio {name} / lstm (nn.LSTM): {best['lstm'] / best[name]:.2f}")

    layer_best = best_seconds(make_layer_steps(args), args.rounds, args.reps)
    print(f"one recurrent layer, forward + backward over [{args.bptt}, {args.batch_size}, {args.hidden_size}]:")
    for name, seconds in layer_best.items():
        ratio = layer_best["layer nn.LSTM"] / seconds
        print(f"  {name:<22}{seconds * 1e3:>8.1f} ms   speed vs nn.LSTM {ratio:.2f}")
    # Achieved GFLOP/s of nn.LSTM (forward + backward = 3 x 2 x 4h(x+h) per token and layer) against
    # the measured fp32 matmul rate of this machine (goal >= 0.6 at a realistic batch).
    h = args.hidden_size
    lstm_flops = 24 * h * (h + h) * args.bptt * args.batch_size
    achieved = lstm_flops / layer_best["layer nn.LSTM"] / 1e9
    peak = matmul_gflops()
    print(f"nn.LSTM layer: {achieved:.2f} GFLOP/s; fp32 matmul 1024^3: {peak:.2f} GFLOP/s; share {achieved / peak:.2f}")


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e9


if __name__ == "__main__":
    main()
