"""Seq2seq model, the translation task (rnnlab.tasks.translation) and its train(), on small models and
real Multi30k."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab.data.parallel import ParallelDataModule, pad_sequences, read_multi30k
from rnnlab.data.tokenize import WordTokenizer
from rnnlab.data.vocab import Vocab
from rnnlab.decoding import beam_search, greedy_decode
from rnnlab.errors import ConfigError, DataError, RnnlabError
from rnnlab.models.seq2seq import Seq2Seq
from rnnlab.resume import load_checkpoint_file as load_checkpoint
from rnnlab.tasks import translation
from rnnlab.tasks.translation import RunConfig, TranslationTask, load, parse_run

KINDS = ["bahdanau", "luong", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for small ops


@pytest.fixture(scope="module")
def pairs(mirror) -> pd.DataFrame:
    return read_multi30k(mirror / "multi30k" / "raw")


def small_model(attention: str, input_feeding: bool = False, layers: int = 2, seed: int = 0) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(
        40,
        50,
        embedding_size=12,
        hidden_size=16,
        num_layers=layers,
        dropout=0.1,
        attention=attention,
        input_feeding=input_feeding,
    ).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sources of lengths 7, 3, 5 (padded to 7) and targets (padded to 6)."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 3, 5])
    src = torch.randint(4, 40, (3, 7), generator=gen)
    src[torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    tgt_in = torch.randint(4, 50, (3, 6), generator=gen)
    tgt_in[:, 0] = Vocab.bos_id
    return src, lengths, tgt_in


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("input_feeding", [False, True])
def test_shapes(attention, input_feeding):
    model = small_model(attention, input_feeding)
    src, lengths, tgt_in = padded_batch()
    enc = model.encode(src, lengths)
    assert enc.outputs.shape == (3, 7, 32)  # 2 directions x 16
    assert enc.state[0].shape == enc.state[1].shape == (2, 3, 16)
    assert enc.mask.tolist()[1] == [True] * 3 + [False] * 4
    assert model(src, lengths, tgt_in).shape == (3, 6, 50)
    assert model.hparams["attention"] == attention


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("input_feeding", [False, True])
def test_sentence_alone_equals_sentence_in_padded_batch(attention, input_feeding):
    model = small_model(attention, input_feeding)
    src, lengths, tgt_in = padded_batch()
    with torch.no_grad():
        enc = model.encode(src, lengths)
        logits = model(src, lengths, tgt_in)
        for row in range(3):
            n = int(lengths[row])
            alone_src, alone_len = src[row : row + 1, :n], lengths[row : row + 1]
            alone = model.encode(alone_src, alone_len)
            assert torch.allclose(alone.outputs[0], enc.outputs[row, :n], atol=1e-6)
            assert torch.all(enc.outputs[row, n:] == 0)  # padding never reaches the outputs
            assert torch.allclose(alone.state[0][:, 0], enc.state[0][:, row], atol=1e-6)
            assert torch.allclose(alone.state[1][:, 0], enc.state[1][:, row], atol=1e-6)
            alone_logits = model(alone_src, alone_len, tgt_in[row : row + 1])
            assert torch.allclose(alone_logits[0], logits[row], atol=1e-6)


@pytest.mark.parametrize("attention", KINDS)
def test_parallel_teacher_forcing_equals_step_by_step(attention):
    model = small_model(attention, input_feeding=False)
    src, lengths, tgt_in = padded_batch()
    decoder = model.incremental_decoder()
    with torch.no_grad():
        parallel = torch.log_softmax(model(src, lengths, tgt_in), dim=-1)
        state = decoder.start(src, lengths)
        for t in range(tgt_in.size(1)):
            log_probs, state, weights = decoder.step(tgt_in[:, t], state)
            assert torch.allclose(log_probs, parallel[:, t], atol=1e-5)
            if attention == "none":
                assert weights is None
            else:
                assert torch.allclose(weights.sum(-1), torch.ones(3), atol=1e-6)
                assert torch.all(weights[1, 3:] == 0)  # pads get exactly zero weight


@pytest.mark.parametrize("attention", ["bahdanau", "none"])
def test_greedy_through_adapter_equals_argmax_loop(attention):
    model = small_model(attention, input_feeding=True)
    src, lengths, _ = padded_batch()
    decoder = model.incremental_decoder()
    result = greedy_decode(decoder, decoder.start(src, lengths), 3, Vocab.bos_id, Vocab.eos_id, max_len=9)
    with torch.no_grad():
        for row in range(3):
            n = int(lengths[row])
            state = model.decoder.initial_state(model.encode(src[row : row + 1, :n], lengths[row : row + 1]))
            token, expected = torch.tensor([Vocab.bos_id]), []
            for _ in range(9):
                logits, state, _ = model.decoder.step(token, state)
                token = logits.argmax(dim=-1)
                if int(token) == Vocab.eos_id:
                    break
                expected.append(int(token))
            assert result.tokens[row] == expected


def test_teacher_forcing_ratio_feeds_own_predictions():
    model = small_model("luong", layers=1).train()
    src, lengths, tgt_in = padded_batch()
    model.decoder.dropout.p = model.encoder.dropout.p = 0.0
    full = model(src, lengths, tgt_in, teacher_forcing=1.0)
    torch.manual_seed(0)
    half = model(src, lengths, tgt_in, teacher_forcing=0.5)
    assert torch.allclose(full[:, 0], half[:, 0], atol=1e-6)  # first step always sees <bos>
    assert not torch.allclose(full, half, atol=1e-4)


def test_empty_source_is_a_clear_error():
    model = small_model("bahdanau")
    src, lengths, _ = padded_batch()
    lengths = lengths.clone()
    lengths[2] = 0
    with pytest.raises(DataError, match="batch row 2 is empty"):
        model.encode(src, lengths)


# -- task: overfitting real pairs, translate, checkpoints ------------------------------------
def tiny_task(pairs: pd.DataFrame, n_pairs: int = 8, **overrides) -> tuple[TranslationTask, pd.DataFrame]:
    train = pairs[pairs["split"] == "train"].head(n_pairs)
    words = WordTokenizer(lowercase=True), WordTokenizer(lowercase=False)
    src_vocab = Vocab.build(words[0].tokenize(s) for s in train["src"])
    tgt_vocab = Vocab.build(words[1].tokenize(s) for s in train["tgt"])
    hparams = (
        dict(
            embedding_size=32,
            hidden_size=64,
            num_layers=1,
            dropout=0.0,
            attention="bahdanau",
            lr=0.01,
            label_smoothing=0.0,
            decode_max_len=30,
        )
        | overrides
    )
    torch.manual_seed(0)
    task = TranslationTask(
        len(src_vocab),
        len(tgt_vocab),
        src_vocab=src_vocab,
        tgt_vocab=tgt_vocab,
        src_tokenizer=words[0],
        tgt_tokenizer=words[1],
        **hparams,
    )
    return task, train


@pytest.fixture(scope="module")
def overfit(pairs):
    """A model trained to memorise 8 real Multi30k pairs (about 150 Adam steps on one batch)."""
    task, train = tiny_task(pairs)
    dm = ParallelDataModule(
        train,
        batch_size=8,
        max_len=40,
        vocabs=(task.src_vocab, task.tgt_vocab),
        tokenizers=(task.src_tokenizer, task.tgt_tokenizer),
    )
    dm.setup()
    batch = next(iter(dm.loader("train", shuffle=False)))
    optimizer = torch.optim.Adam(task.parameters(), lr=0.01)
    task.train()
    losses = []
    for _ in range(150):
        logits = task(batch.src, batch.src_lengths, batch.tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    task.eval()
    return task, train, losses


def test_overfits_a_batch_of_real_pairs_and_translates_it_back(overfit):
    task, train, losses = overfit
    assert losses[0] > 3.0 and losses[-1] < 0.02
    sources, targets = train["src"].tolist(), train["tgt"].tolist()
    expected = [task.tgt_tokenizer.detokenize(task.tgt_tokenizer.tokenize(t)) for t in targets]
    assert task.translate(sources, beam_size=1) == expected
    assert task.translate(sources, beam_size=4) == expected


def test_translate_rejects_empty_lines_and_counts_truncation(overfit):
    task, train, _ = overfit
    with pytest.raises(DataError, match="sentence 2 is empty"):
        task.translate([train["src"].iloc[0], "   "])
    long_sentence = " ".join(["dog"] * 50)
    out = task.translate([long_sentence, train["src"].iloc[0]], beam_size=2, max_len=12)  # 50 and 11 tokens
    assert len(out) == 2 and task.last_truncated == 1
    # unknown words map to <unk> instead of failing
    assert len(task.encode_sources(["zyzzyva qwxv"])[0]) == 2
    assert task.encode_sources(["zyzzyva qwxv"])[0].tolist() == [Vocab.unk_id, Vocab.unk_id]


def save_task(task: TranslationTask, path: Path) -> Path:
    checkpoint = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_checkpoint_round_trip_needs_no_data(overfit, tmp_path):
    task, train, _ = overfit
    path = save_task(task, tmp_path / "model.ckpt")
    task.src_vocab.save(tmp_path / "vocab.src.json")  # checked against the checkpoint's own on load
    task.tgt_vocab.save(tmp_path / "vocab.tgt.json")
    sources = train["src"].tolist()[:3]
    for ref in (tmp_path, path):  # the folder or the checkpoint file
        loaded = load(ref)
        assert not loaded.training
        assert loaded.translate(sources, beam_size=3) == task.translate(sources, beam_size=3)
    assert isinstance(load_checkpoint(path)["translation"]["tgt_vocab"]["itos"], list)  # safe to load (weights_only)


def test_checkpoint_vocab_mismatch_names_both_sizes(overfit, tmp_path):
    task, _, _ = overfit
    n = len(task.tgt_vocab)
    path = save_task(task, tmp_path / "model.ckpt")
    # A different saved vocabulary next to the model.
    other = Vocab(task.tgt_vocab.itos[:-1])
    other.save(tmp_path / "vocab.tgt.json")
    with pytest.raises(RnnlabError, match=rf"target side.*\({n} tokens.*\({n - 1} tokens"):
        load(path)
    (tmp_path / "vocab.tgt.json").unlink()
    assert len(load(path).tgt_vocab) == n
    # A checkpoint whose stored vocabulary does not fit the model's output layer.
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["translation"]["tgt_vocab"] = other.to_dict()
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match=rf"target vocabulary has {n - 1} tokens but the model was built for {n}"):
        load(path)
    with pytest.raises(RnnlabError, match="nowhere"):
        load(tmp_path / "nowhere")


# -- config and the training entry point ------------------------------------------------------
WHERE = "train_seq2seq.runs.multi30k-none"


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=rf"{WHERE}\.hiden_size: unknown key"):
        parse_run({"hiden_size": 128}, WHERE)
    with pytest.raises(ConfigError, match=rf"{WHERE}\.attention"):
        parse_run({"attention": "dot"}, WHERE)
    with pytest.raises(ConfigError, match=rf"{WHERE}\.monitor"):
        parse_run({"val_bleu": False, "monitor": "val/bleu"}, WHERE)
    with pytest.raises(ConfigError, match=rf"{WHERE}\.max_train_pairs: expected null or an integer >= 1"):
        parse_run({"max_train_pairs": 0}, WHERE)
    for moved in ("num_threads", "enable_progress_bar"):  # trainer.num_threads / trainer.progress_bar now
        with pytest.raises(ConfigError, match=rf"{WHERE}\.{moved}: unknown key"):
            parse_run({moved: 1}, WHERE)
    run = parse_run({}, WHERE)
    assert run.attention == "bahdanau" and run.beam_sizes == [1, 3, 5, 10] and run.enabled is True


def test_the_module_defaults_are_the_run_config_defaults():
    """One place per default: TranslationTask's keyword defaults are RunConfig's."""
    import inspect

    run = RunConfig()
    signature = inspect.signature(TranslationTask.__init__).parameters
    shared = [k for k in signature if hasattr(run, k)]
    assert {"hidden_size", "dropout", "lr", "length_penalty", "monitor"} <= set(shared)
    assert {k: signature[k].default for k in shared} == {k: getattr(run, k) for k in shared}
    assert signature["decode_max_len"].default == run.max_len == 50 and run.hidden_size == 128


def _context(tmp_path: Path, name: str = "tiny", seed: int = 3):
    from rnnlab.resume import ResumeDir
    from rnnlab.tasks.base import RunContext, StagePaths
    from rnnlab.tracking import NullTracker
    from rnnlab.training import TrainerConfig

    out = tmp_path / "models" / name
    out.mkdir(parents=True)
    return RunContext(
        name=name,
        where=f"train_seq2seq.runs.{name}",
        seed=seed,
        trainer=TrainerConfig(num_threads=1),
        paths=StagePaths(prepared=tmp_path / "prepared"),
        out_dir=out,
        resume=ResumeDir.scratch(tmp_path / "resume"),
        tracker=NullTracker(),
        writer=True,
    )


def test_train_translation_end_to_end(pairs, tmp_path):
    from rnnlab.distributed import seed_everything
    from rnnlab.io import write_parquet

    small = pairs.groupby("split").head(120)
    (tmp_path / "prepared" / "multi30k").mkdir(parents=True)
    write_parquet(tmp_path / "prepared" / "multi30k" / "pairs.parquet", small)
    run = parse_run(
        dict(
            embedding_size=16,
            hidden_size=16,
            max_epochs=2,
            limit_train_batches=3,
            batch_size=32,
            beam_sizes=[1, 2],
            heatmaps=2,
            max_len=20,
            tokenizer="bpe",
            bpe_vocab_size=300,
            min_freq=1,
        ),
        "train_seq2seq.runs.tiny",
    )
    ctx = _context(tmp_path)
    assert translation.data_files(run, ctx.paths) == [tmp_path / "prepared" / "multi30k" / "pairs.parquet"]
    seed_everything(ctx.seed)
    output = translation.train(run, ctx)
    row, folder = output.row, ctx.out_dir
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["model.ckpt"]  # the resume/best ones live elsewhere
    assert row["epochs"] == 2 and row["steps"] == 6
    # Measured (6 steps of a 16-unit model, seed 3): just under a uniform guess over the 278 target
    # pieces; perplexity is exp of the teacher-forced loss, both splits.
    assert row["tgt_vocab_size"] == 278
    assert row["test_ppl"] == pytest.approx(276.646, rel=0.01) and row["val_ppl"] == pytest.approx(273.096, rel=0.01)
    assert row["val_ppl"] < row["test_ppl"] < row["tgt_vocab_size"]
    for split in ("val", "test"):
        assert row[f"{split}_ppl"] == pytest.approx(math.exp(row[f"{split}_loss"]), rel=1e-3)
    assert row["pairs"] == {"train": 120, "val": 120, "test": 120}
    assert row["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "case:lc" in row["tok_lc_bleu_signature"]
    assert not any(k.endswith("_beam1") for k in row) and "beam1_equals_greedy" not in row  # beam 1 is greedy
    assert {"sacrebleu_greedy", "chrf_beam2", "tok_lc_bleu_beam2", "sentences_per_s_greedy"} <= set(row)
    # Measured: with 300 BPE pieces half to two thirds of the sources and 3 to 4 in 5 German targets
    # exceed max_len 20 (cut for training; references are never cut).
    assert row["truncated"] == {
        "train_src": 59,
        "train_tgt": 87,
        "val_src": 81,
        "val_tgt": 96,
        "test_src": 76,
        "test_tgt": 86,
    }
    assert sorted(p.name for p in (folder / "attention").glob("*.png")) == ["val_00.png", "val_01.png"]
    rows = json.loads((folder / "bleu_vs_beam.json").read_text())
    assert [r["beam"] for r in rows] == [1, 2]
    assert rows[0]["sacrebleu"] == row["sacrebleu_greedy"] and rows[1]["chrf"] == row["chrf_beam2"]
    assert output.plot_rows == [
        {"run": "tiny", "beam": 1, "bleu": row["sacrebleu_greedy"]},
        {"run": "tiny", "beam": 2, "bleu": row["sacrebleu_beam2"]},
    ]
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 16
    assert len(json.loads((folder / "history.json").read_text())) == 2
    folders = {(Path(p).name, f) for p, f in output.artifacts}
    assert {
        ("model.ckpt", "model"),
        ("vocab.tgt.json", "model"),
        ("test_hyps_beam2.txt", "hyps"),
        ("val_00.png", "attention"),
        ("bleu_vs_beam.png", None),
        ("history.json", None),
    } <= folders
    hyps = (folder / "test_hyps_greedy.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 120
    task = load(folder)
    assert task.src_tokenizer.name == "bpe"
    test_sources = small[small["split"] == "test"]["src"].tolist()
    assert task.translate(test_sources, beam_size=1) == hyps
    # Beam search of width 1 (reachable through rnnlab.decoding) reproduces greedy decoding on
    # the trained model and real data (the old row's beam1_equals_greedy).
    encoded = task.encode_sources(test_sources)
    src = pad_sequences(encoded, Vocab.pad_id)
    lengths = torch.as_tensor([len(e) for e in encoded])
    decoder = task.model.incremental_decoder()
    # the task's output rules (no <unk>, the n-gram block) apply to both, as to task.translate
    common = dict(batch_size=len(encoded), bos_id=Vocab.bos_id, eos_id=Vocab.eos_id, max_len=20, rules=task.rules)
    greedy = greedy_decode(decoder, decoder.start(src, lengths), **common)
    beam1 = beam_search(decoder, decoder.start(src, lengths), beam_size=1, length_penalty=1.0, **common)
    assert beam1.tokens == greedy.tokens and [task.ids_to_text(t) for t in greedy.tokens] == hyps
    # score() on the folder alone reproduces the row (the evaluate stage's path)
    result = translation.score(folder, ctx.paths, beam_sizes=[1, 2])
    assert {k: result[k] for k in ("sacrebleu_greedy", "tok_lc_bleu_beam2", "chrf_beam2", "test_ppl")} == {
        k: row[k] for k in ("sacrebleu_greedy", "tok_lc_bleu_beam2", "chrf_beam2", "test_ppl")
    }
    assert [b["beam"] for b in result["beams"]] == [1, 2] and result["test_sentences"] == 120
