"""The adaptive-softmax output layer (train_lm ``output: adaptive``): a proper distribution over the
whole vocabulary for every recurrent core, a training loss equal to that distribution's NLL, and a
real PTB run through the stage that learns and whose checkpoint re-scores to the same test ppl."""

import json
import math

import pytest
import torch
from lm_helpers import train_lm_run

from rnnlab.errors import ConfigError
from rnnlab.models.lm import RECURRENT_CORES, build_language_model
from rnnlab.tasks.lm import parse_run, score

VOCAB, CUTOFFS = 50, [10, 30]


@pytest.mark.parametrize("core", RECURRENT_CORES)
def test_adaptive_log_probs_sum_to_one_and_match_the_training_loss(core):
    torch.manual_seed(0)
    hp = dict(embedding_size=16, hidden_size=16, num_layers=2, dropout=0.0, output="adaptive", cutoffs=CUTOFFS)
    model = build_language_model(core, VOCAB, **hp).eval()
    tokens, targets = torch.randint(0, VOCAB, (7, 3)), torch.randint(0, VOCAB, (7, 3))  # [seq, batch]
    log_probs, _ = model(tokens)  # [seq, batch, vocab]
    assert log_probs.shape == (7, 3, VOCAB)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(7, 3), atol=1e-5)
    # the tail clusters are scored too: words past the head get their share, not -inf or 0
    assert log_probs[..., CUTOFFS[-1] :].exp().sum(-1).min() > 0.01
    loss, _ = model.adaptive_loss(tokens, targets)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    assert loss.item() == pytest.approx(nll.item(), rel=1e-5)
    # and cross-entropy on the log-probs (the evaluation path) is that same NLL
    ce = torch.nn.functional.cross_entropy(log_probs.reshape(-1, VOCAB), targets.reshape(-1))
    assert ce.item() == pytest.approx(nll.item(), rel=1e-5)


def test_default_output_stays_full():
    run = parse_run({"corpus": "ptb", "model": "lstm"}, "train_lm.runs.r")
    assert run.output == "full" and "output" not in run.model_hparams()  # old checkpoints' hparams
    model = build_language_model("lstm", VOCAB, **run.model_hparams())
    assert isinstance(model.decoder, torch.nn.Linear) and model.V.shape == (VOCAB, 200)


def test_bad_adaptive_params_name_the_key():
    with pytest.raises(ConfigError, match=r"train_lm.runs.r.output: adaptive is for the recurrent models"):
        parse_run({"corpus": "ptb", "model": "mlp", "output": "adaptive"}, "train_lm.runs.r")
    with pytest.raises(ConfigError, match=r"train_lm.runs.r.output"):
        parse_run({"corpus": "ptb", "model": "lstm", "output": "hierarchical"}, "train_lm.runs.r")
    hp = dict(embedding_size=8, hidden_size=8, num_layers=1, dropout=0.0, output="adaptive")
    with pytest.raises(ConfigError, match=r"cutoffs: expected increasing integers in \[1, vocab size - 1 = 49\]"):
        build_language_model("lstm", VOCAB, cutoffs=[10, 50], **hp)
    with pytest.raises(ConfigError, match=r"tie_weights needs output: full"):
        build_language_model("lstm", VOCAB, cutoffs=CUTOFFS, tie_weights=True, **hp)


def test_adaptive_lstm_learns_on_real_ptb(prepared_ptb, tmp_path):
    run = dict(model="lstm", embedding_size=32, hidden_size=32, num_layers=1, dropout=0.0, batch_size=16, bptt=20,
               lr=20.0, train_fraction=0.05, limit_train_batches=60, samples=1, output="adaptive",
               cutoffs=[2000, 6000])  # fmt: skip
    row = train_lm_run(prepared_ptb, tmp_path, "ptb-adaptive", seed=7, **run)
    history = json.loads((tmp_path / "models" / "ptb-adaptive" / "history.json").read_text())
    assert history[0]["train/loss_epoch"] < math.log(10002) - 1.0  # from uniform (9.21) down
    # measured (seed 7, 1 thread): val ppl 927.8 after 60 batches; the same run with output: full
    # gives 1024.5. With PyTorch's default init of the adaptive layer (not INIT_RANGE) it was 1773.2.
    assert row["val_ppl"] == pytest.approx(927.804, rel=1e-3)
    # The checkpoint rebuilds the adaptive layer; its full-vocabulary scoring gives the training ppl.
    result = score(tmp_path / "models" / "ptb-adaptive" / "model.ckpt", prepared_ptb, batch_size=10, bptt=20)
    assert result["ppl"] == pytest.approx(row["test_ppl"], rel=1e-4)
