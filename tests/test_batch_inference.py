"""Batch inference from the command line on real data with tiny trained models:

- ``rnnlab translate --input FILE --output FILE``: the first 20 sentences of the real Multi30k
  test set (+ an empty line) through a tiny translator trained by the real ``train_seq2seq`` stage
  loop; output line i is input line i's translation, equal to ``translate_lines`` on that line alone.
- ``rnnlab caption DIR --out captions.jsonl``: copies of real Flickr8k images plus a truncated JPEG,
  a text file named ``.jpg`` and a plain text file, through a tiny captioner trained by the real
  ``features`` + ``train_captioner`` stages; one JSON line per good image, equal to
  ``caption_images`` on that image alone, the bad files named on stderr and counted.
- CLI errors (missing input, out-of-range --beam, missing output folder, a folder without a
  decodable image): one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from rnnlab.cli import main as cli_main
from rnnlab.stages.train import train_stage
from rnnlab.tasks import captioning, translation
from rnnlab.tasks.base import StagePaths

pytestmark = pytest.mark.usefixtures("one_thread")

N_SENTENCES = 20
EMPTY_AT = 7  # the empty input line goes here (inside the first batch of 8, not at an edge)
N_IMAGES = 5


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``rnnlab <argv>`` in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def translator(tmp_path_factory, mirror) -> Path:
    """A tiny En->De model folder trained by the real stage loop (tracking off) on real Multi30k."""
    from test_seq2seq_stage import tiny_params

    from rnnlab.data.readers import read_parallel_corpus
    from rnnlab.io import write_parquet

    root = tmp_path_factory.mktemp("translator")
    prepared = root / "prepared"
    (prepared / "multi30k").mkdir(parents=True)
    write_parquet(prepared / "multi30k" / "pairs.parquet", read_parallel_corpus(mirror / "multi30k"))
    params = tiny_params(tracking=False)
    # the end-of-training test scoring: greedy only (a copy: the defaults dict is test_seq2seq_stage's own)
    params["train_seq2seq"]["defaults"] = {**params["train_seq2seq"]["defaults"], "beam_sizes": [1]}
    threads = torch.get_num_threads()
    train_stage(
        params,
        "train_seq2seq",
        "multi30k-attention",
        StagePaths(prepared=prepared),
        root / "models",
        root / "metrics.json",
        root / "plots.json",
        root / "checkpoints",
    )
    torch.set_num_threads(threads)
    return root / "models" / "multi30k-attention"


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, mirror) -> Path:
    """A tiny soft-attention captioner folder trained by the real features + train_captioner stages."""
    from test_caption_stage import tiny_params

    from rnnlab.data.captions import read_flickr8k
    from rnnlab.stages.features import features_stage

    root = tmp_path_factory.mktemp("captioner")
    table, _ = read_flickr8k(mirror / "flickr8k")
    (root / "prepared" / "flickr8k").mkdir(parents=True)
    table.to_parquet(root / "prepared" / "flickr8k" / "captions.parquet")
    params = tiny_params()
    params["tracking"] = {"enabled": False}
    params["train_captioner"]["defaults"] = {**params["train_captioner"]["defaults"], "beam_sizes": [1]}  # a copy
    params["train_captioner"]["runs"] = {"flickr8k-soft_attention": {"decoder": "soft_attention"}}
    threads = torch.get_num_threads()
    features_stage(params, root / "prepared", mirror, root / "features", root / "features.json")
    train_stage(
        params,
        "train_captioner",
        "flickr8k-soft_attention",
        StagePaths(prepared=root / "prepared", features=root / "features", raw=mirror),
        root / "models",
        root / "metrics.json",
        root / "plots.json",
        root / "checkpoints",
    )
    torch.set_num_threads(threads)
    return root / "models" / "flickr8k-soft_attention"


@pytest.fixture()
def english(mirror, tmp_path) -> tuple[Path, list[str]]:
    """The first 20 lines of the real Multi30k English test file, an empty line inserted."""
    with gzip.open(mirror / "multi30k" / "raw" / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as fh:
        lines = [next(fh).rstrip("\n") for _ in range(N_SENTENCES)]
    lines.insert(EMPTY_AT, "")
    path = tmp_path / "test.en"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


# ----------------------------------------------------------------------------------------------
# rnnlab translate --input --output
# ----------------------------------------------------------------------------------------------
def test_translate_file_is_line_aligned_and_equals_one_by_one(translator, english, tmp_path, capsys):
    source, lines = english
    out = tmp_path / "test.de"
    code, stdout, stderr = run_cli(
        [
            "translate",
            "--input",
            str(source),
            "--output",
            str(out),
            "--beam",
            "2",
            "--batch-size",
            "8",
            "--run",
            str(translator),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert stdout == ""
    hyps = out.read_text(encoding="utf-8").split("\n")
    assert hyps[-1] == "" and len(hyps) - 1 == len(lines) == N_SENTENCES + 1  # one output line per input line
    hyps = hyps[:-1]
    assert hyps[EMPTY_AT] == ""
    module = translation.load(translator)
    alone = [translation.translate_lines(module, [line], 2)[0][0] if line else "" for line in lines]
    assert hyps == alone
    assert all(h.strip() for i, h in enumerate(hyps) if i != EMPTY_AT)
    assert f"{N_SENTENCES + 1} line(s)" in stderr and f"{N_SENTENCES} sentence(s) translated" in stderr
    assert "1 empty or whitespace-only line(s) left empty" in stderr and "sentences/s" in stderr
    assert f"{N_SENTENCES + 1}/{N_SENTENCES + 1}" in stderr  # the progress bar reached the end
    assert not list(tmp_path.glob(".test.de.*"))  # no temp file left beside the output


def test_translate_file_to_stdout_and_library_counts(translator, english, capsys):
    source, lines = english
    done = translation.translate_command(None, 1, translator, input_path=source, batch_size=5, progress=False)
    captured = capsys.readouterr()
    assert done == N_SENTENCES
    assert captured.out.split("\n")[:-1] == translation.translate_lines(translation.load(translator), lines, 1)[0]
    assert "-> stdout" in captured.err


def test_translate_cli_errors_exit_2(translator, english, tmp_path, capsys):
    source, _ = english
    run = ["--run", str(translator)]
    code, _, err = run_cli(
        ["translate", "--input", str(tmp_path / "nope.en"), "--output", str(tmp_path / "o")] + run, capsys
    )
    assert code == 2 and f"{tmp_path / 'nope.en'}: input file not found" in err
    assert not (tmp_path / "o").exists()
    for beam in ("0", "11"):
        code, _, err = run_cli(["translate", "--input", str(source), "--beam", beam] + run, capsys)
        assert code == 2 and f"--beam: expected an integer in 1..10, got {beam}" in err
    code, _, err = run_cli(
        ["translate", "--input", str(source), "--output", str(tmp_path / "no" / "dir" / "o.de")] + run, capsys
    )
    assert code == 2 and "the output folder" in err and "does not exist" in err
    code, _, err = run_cli(["translate", "--input", str(tmp_path), "--output", str(tmp_path / "o")] + run, capsys)
    assert code == 2 and "not a regular file" in err
    bad = tmp_path / "latin1.en"
    bad.write_bytes(b"A dog runs.\nA caf\xe9 .\n")
    code, _, err = run_cli(["translate", "--input", str(bad), "--output", str(tmp_path / "o")] + run, capsys)
    assert code == 2 and f"{bad}: line 2 is not valid UTF-8" in err
    code, _, err = run_cli(["translate", "--input", str(source), "--output", str(source)] + run, capsys)
    assert code == 2 and "would be overwritten" in err
    code, _, err = run_cli(["translate", "--input", str(source), "--batch-size", "0"] + run, capsys)
    assert code == 2 and "--batch-size" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# rnnlab caption DIR --out
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def photos(mirror, tmp_path) -> tuple[Path, list[str]]:
    """Five real Flickr8k images, a truncated JPEG, a text file named .jpg and a notes.txt."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((mirror / "flickr8k" / "images").glob("*.jpg"))[: N_IMAGES + 1]
    for src in sources[:N_IMAGES]:
        shutil.copyfile(src, folder / src.name)
    data = sources[N_IMAGES].read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    (folder / "holiday.JPG").write_text("this is not a picture\n", encoding="utf-8")
    (folder / "notes.txt").write_text("the photos of the trip\n", encoding="utf-8")
    return folder, [src.name for src in sources[:N_IMAGES]]


def test_caption_folder_one_json_line_per_good_image(captioner, photos, tmp_path, capsys, monkeypatch):
    folder, good = photos
    sizes = []
    caption = captioning.ImageCaptioner.caption

    def spy(self, images, *args, **kwargs):
        sizes.append(len(images))
        return caption(self, images, *args, **kwargs)

    monkeypatch.setattr(captioning.ImageCaptioner, "caption", spy)
    out = tmp_path / "captions.jsonl"
    code, stdout, stderr = run_cli(
        ["caption", str(folder), "--out", str(out), "--beam", "3", "--batch-size", "2", "--run", str(captioner)], capsys
    )
    assert code == 0, stderr
    assert stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in rows] == sorted(good)  # sorted, bad files left out
    assert max(sizes) <= 2 and sum(sizes) == N_IMAGES  # loaded and captioned per batch of 2
    monkeypatch.undo()
    for row in rows:
        assert row["caption"].strip()
        assert row["caption"] == captioning.caption_images(captioner, [folder / row["image"]], beam_size=3)[0]
    assert "broken.jpg: truncated or incomplete image" in stderr
    assert "holiday.JPG: not an image" in stderr
    assert "notes.txt: not an image file" in stderr
    assert f"{N_IMAGES} image(s) captioned, 2 bad image(s) skipped, 1 other file(s) skipped" in stderr
    assert "images/s" in stderr
    # `rnnlab caption IMAGE` still prints one caption, the same one
    code, stdout, _ = run_cli(
        ["caption", str(folder / rows[0]["image"]), "--beam", "3", "--run", str(captioner)], capsys
    )
    assert code == 0 and stdout == rows[0]["caption"] + "\n"


def test_caption_folder_errors_exit_2(captioner, photos, tmp_path, capsys):
    folder, good = photos
    run = ["--run", str(captioner)]
    for name in good + ["broken.jpg"]:
        (folder / name).unlink()
    out = tmp_path / "captions.jsonl"
    code, _, err = run_cli(["caption", str(folder), "--out", str(out)] + run, capsys)
    assert code == 2 and f"error: {folder}: no decodable image (1 bad image file(s): holiday.JPG)" in err
    assert not out.exists()
    (folder / "holiday.JPG").unlink()
    code, _, err = run_cli(["caption", str(folder), "--out", str(out)] + run, capsys)
    assert code == 2 and f"{folder}: no image files" in err
    code, _, err = run_cli(["caption", str(folder), "--beam", "0"] + run, capsys)
    assert code == 2 and "--beam: expected an integer in 1..10, got 0" in err
    code, _, err = run_cli(["caption", str(folder), "--out", str(tmp_path / "no" / "c.jsonl")] + run, capsys)
    assert code == 2 and "does not exist" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# --attention FILE [--plot] (issue 16 item 5)
# ----------------------------------------------------------------------------------------------
def _check_attention_records(records: list[dict], sources: list[str]) -> None:
    assert [r["input"] for r in records] == sources
    for rec in records:
        weights = torch.tensor(rec["weights"])
        assert weights.shape == (len(rec["target"]), len(rec["source"])), rec
        assert len(rec["target"]) >= 1 and len(rec["source"]) >= 1
        assert torch.allclose(weights.sum(dim=1), torch.ones(len(rec["target"])), atol=1e-4)
        assert (weights >= 0).all()


def test_translate_attention_json_and_png(translator, english, tmp_path, capsys):
    path, lines = english
    out = tmp_path / "attn.json"
    code, stdout, err = run_cli(
        ["translate", lines[0], "--run", str(translator), "--beam", "2", "--attention", str(out), "--plot"], capsys
    )
    assert code == 0, err
    records = json.loads(out.read_text(encoding="utf-8"))
    _check_attention_records(records, [lines[0]])
    module = translation.load(translator)
    rec = records[0]
    assert rec["source"] == module.src_vocab.decode(module.encode_sources([lines[0]])[0].tolist())
    # the target tokens are the printed translation's (+ <eos> when it was emitted)
    assert module.tgt_tokenizer.detokenize([t for t in rec["target"] if t != "<eos>"]) == stdout.strip()
    assert (tmp_path / "attn.png").stat().st_size > 1000
    # several sentences (--input): one record each, blank lines left out, one PNG each
    out2 = tmp_path / "many.json"
    code, _, err = run_cli(
        ["translate", "--input", str(path), "--run", str(translator), "--attention", str(out2), "--plot"], capsys
    )
    assert code == 0, err
    _check_attention_records(json.loads(out2.read_text(encoding="utf-8")), [x for x in lines if x.strip()])
    assert len(list(tmp_path.glob("many_*.png"))) == N_SENTENCES


def test_caption_attention_json_and_png(captioner, photos, tmp_path, capsys):
    folder, good = photos
    image = folder / good[0]
    out = tmp_path / "cap_attn.json"
    code, stdout, err = run_cli(["caption", str(image), "--run", str(captioner), "--attention", str(out)], capsys)
    assert code == 0, err
    records = json.loads(out.read_text(encoding="utf-8"))
    _check_attention_records(records, [str(image)])
    assert records[0]["source"][:2] == ["r0c0", "r0c1"] and len(records[0]["source"]) == 49  # 7 x 7 regions
    assert not (tmp_path / "cap_attn.png").exists()  # no --plot, no PNG
    code, _, err = run_cli(["caption", str(image), "--run", str(captioner), "--attention", str(out), "--plot"], capsys)
    assert code == 0, err
    assert (tmp_path / "cap_attn.png").stat().st_size > 1000
    code, _, err = run_cli(["caption", str(image), "--run", str(captioner), "--plot"], capsys)
    assert code == 2 and "--plot needs --attention" in err
