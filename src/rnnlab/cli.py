"""Command-line entry points: ``rnnlab <command>`` and the DVC stage scripts' error handling."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rnnlab.errors import RnnlabError


class _DropAdverts(logging.Filter):
    """Lightning logs a cloud-service tip at every Trainer start; it is noise in stage logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def setup_logging(level: int = logging.INFO) -> None:
    import warnings

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropAdverts())
    # Lightning 2.6 + torch 2.14 deprecation inside Lightning itself; nothing for us to change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def record_imports(folder: str) -> None:
    """Write the project files this process imported to ``<folder>/<stage>.json`` (``RNNLAB_RECORD_IMPORTS``;
    ``<stage>`` as DVC names it: ``train_lm@ptb-lstm``): the test that every dvc.yaml stage depends
    on every module it runs (tests/test_pipeline.py) reads them."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # the checkout: src/rnnlab/cli.py -> .
    package = Path(__file__).resolve().parent
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(package):
            files.add(Path(file).resolve().relative_to(root).as_posix())
    stage = Path(sys.argv[0]).stem
    if "--run" in sys.argv[:-1]:
        stage += "@" + sys.argv[sys.argv.index("--run") + 1]
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{stage}.json").write_text(json.dumps(sorted(files), indent=1) + "\n")


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage; user-facing errors become one clear line on stderr and exit code 2."""
    import os

    setup_logging()
    try:
        main()
    except RnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if os.environ.get("RNNLAB_RECORD_IMPORTS"):
            record_imports(os.environ["RNNLAB_RECORD_IMPORTS"])


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """The decoding-output flags that translate and caption share (README "Decoding rules")."""
    parser.add_argument("--allow-unk", action="store_true", help="let <unk> be emitted (never, by default)")
    parser.add_argument(
        "--attention",
        default=None,
        metavar="FILE",
        help="also write the per-token attention weights to FILE (JSON; README 'Decoding rules')",
    )
    parser.add_argument("--plot", action="store_true", help="with --attention: a heatmap PNG beside FILE too")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rnnlab", description="rnnlab: recurrent sequence models pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p_repr = sub.add_parser("represent", help="show bag-of-words / one-hot codes of a sentence over a vocab")
    p_repr.add_argument("sentence")
    p_repr.add_argument("--vocab", default="data/prepared/ptb/vocab.json")
    p_gen = sub.add_parser("generate", help="sample text from a trained language model")
    p_gen.add_argument(
        "--run", required=True, help="MLflow run id, train_lm model folder (neural or n-gram) or model.ckpt"
    )
    p_gen.add_argument("--prompt", default="")
    p_gen.add_argument("--tokens", type=int, default=50)
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--allow-unk", action="store_true", help="let <unk> be sampled (never, by default)")
    p_tr = sub.add_parser("translate", help="English -> German with a train_seq2seq model (stdin when no sentence)")
    p_tr.add_argument(
        "sentence", nargs="?", help="English sentence; omitted: translate --input (or stdin) line by line"
    )
    p_tr.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="UTF-8 text file, one English sentence a line (output line i for input line i)",
    )
    p_tr.add_argument("--output", default=None, metavar="FILE", help="write the translations here (default: stdout)")
    p_tr.add_argument("--beam", type=int, default=5, help="beam size (1 = greedy; at most rnnlab.serving.MAX_BEAM)")
    p_tr.add_argument("--batch-size", type=int, default=256, help="lines translated together (default 256)")
    p_tr.add_argument(
        "--run",
        default=None,
        help="train_seq2seq model folder, model.ckpt or MLflow run id "
        "(default: data/models/seq2seq/multi30k-attention)",
    )
    _add_output_flags(p_tr)
    p_cap = sub.add_parser(
        "caption", help="caption an image file, or every image of a folder, with a train_captioner model"
    )
    p_cap.add_argument("image", help="path to a JPEG/PNG image, or a folder of images (then one JSON line per image)")
    p_cap.add_argument(
        "--out", default=None, metavar="FILE", help="JSON lines {image, caption} for a folder (default: stdout)"
    )
    p_cap.add_argument("--beam", type=int, default=3, help="beam size (1 = greedy; at most rnnlab.serving.MAX_BEAM)")
    p_cap.add_argument("--batch-size", type=int, default=32, help="images loaded and captioned together (default 32)")
    p_cap.add_argument(
        "--run",
        default=None,
        help="train_captioner model folder, model.ckpt or MLflow run id "
        "(default: data/models/captioner/flickr8k-soft_attention)",
    )
    _add_output_flags(p_cap)
    args = parser.parse_args(argv)
    if args.command in ("translate", "caption") and args.plot and not args.attention:
        parser.error("--plot needs --attention FILE")
    setup_logging(logging.WARNING)
    try:
        if args.command == "represent":
            from rnnlab.data.vocab import Vocab
            from rnnlab.represent import bag_of_words, one_hot_sequence

            vocab = Vocab.load(args.vocab)
            tokens = args.sentence.split()
            bow = bag_of_words(tokens, vocab)
            nz = {vocab.itos[i]: int(bow[i]) for i in bow.nonzero().flatten().tolist()}
            print("bag of words:", nz)
            print("one-hot ids :", one_hot_sequence(tokens, vocab).argmax(dim=1).tolist())
        elif args.command == "generate":
            print(generate_command(args.run, args.prompt, args.tokens, args.temperature, args.seed, args.allow_unk))
        elif args.command == "translate":
            from rnnlab.tasks.translation import translate_command

            beam = check_beam(args.beam)
            if args.attention and args.sentence is None and args.input is None:
                raise RnnlabError("--attention needs a sentence or --input FILE (not stdin)")
            translate_command(
                args.sentence,
                beam,
                args.run,
                input_path=args.input,
                output_path=args.output,
                batch_size=args.batch_size,
                allow_unk=args.allow_unk,
            )
            if args.attention:
                translation_attention_command(args, beam)
        elif args.command == "caption":
            from pathlib import Path

            beam = check_beam(args.beam)
            if args.attention and Path(args.image).is_dir():
                raise RnnlabError("--attention: give one image file, not a folder")
            if args.attention:
                print(caption_attention_command(args.image, beam, args.run, args.attention, args.plot, args.allow_unk))
            elif Path(args.image).is_dir() or args.out is not None:  # a folder (an image file with --out: one line)
                from rnnlab.tasks.captioning import caption_folder_command

                caption_folder_command(args.image, args.out, beam, args.run, args.batch_size, allow_unk=args.allow_unk)
            else:
                print(caption_command(args.image, beam, args.run, args.allow_unk))
    except RnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def generate_command(run: str, prompt: str, tokens: int, temperature: float, seed: int, allow_unk: bool = False) -> str:
    from rnnlab.generate import check_sampling, sample
    from rnnlab.inference import load_model

    check_sampling(tokens, temperature, dashes="--")  # before a model is loaded (or fetched from MLflow)
    return sample(load_model(run, "lm"), prompt, tokens, temperature, seed, allow_unk)


def check_beam(beam: int) -> int:
    """``--beam`` within 1..:data:`rnnlab.serving.MAX_BEAM` (the limit serving applies too)."""
    import warnings

    # MLflow warns (3 lines, at class definition) that predict() has no type hints: kept off the CLI's stderr
    with warnings.catch_warnings(record=True):
        from rnnlab.serving import MAX_BEAM

    if not 1 <= beam <= MAX_BEAM:
        raise RnnlabError(f"--beam: expected an integer in 1..{MAX_BEAM}, got {beam}")
    return beam


def caption_command(image: str, beam: int = 3, run: str | None = None, allow_unk: bool = False) -> str:
    from rnnlab.data.images import load_image
    from rnnlab.inference import resolve_model
    from rnnlab.tasks.captioning import caption_images

    load_image(image)  # a bad file is reported before any model is loaded or fetched
    return caption_images(resolve_model(run, "captioning"), [image], beam_size=beam, allow_unk=allow_unk)[0]


def caption_attention_command(
    image: str, beam: int, run: str | None, attention: str, plot: bool, allow_unk: bool = False
) -> str:
    """``rnnlab caption IMAGE --attention FILE [--plot]``: the caption, and its attention written to FILE."""
    import dataclasses

    from rnnlab.attention_dump import caption_attention, write_attention
    from rnnlab.data.images import load_image
    from rnnlab.inference import resolve_model
    from rnnlab.tasks.captioning import ImageCaptioner

    load_image(image)
    captioner = ImageCaptioner(resolve_model(run, "captioning"))
    captioner.module.rules = dataclasses.replace(captioner.module.rules, allow_unk=allow_unk)
    records = caption_attention(captioner, [image], beam)
    write_attention(records, attention, plot)
    return " ".join(t for t in records[0]["target"] if t != "<eos>")


def translation_attention_command(args, beam: int) -> None:
    """``rnnlab translate ... --attention FILE [--plot]``: the attention of each translated sentence."""
    import dataclasses

    from rnnlab.attention_dump import translation_attention, write_attention
    from rnnlab.inference import resolve_model
    from rnnlab.tasks.translation import DEFAULT_RUN, load, read_input_lines

    run = None if args.run is None or str(args.run) == DEFAULT_RUN else args.run
    module = load(resolve_model(run, "translation"))
    module.rules = dataclasses.replace(module.rules, allow_unk=args.allow_unk)
    if args.sentence is not None:
        sentences = [args.sentence]
    else:
        sentences = [line for line in read_input_lines(args.input) if line.strip()]
    write_attention(translation_attention(module, sentences, beam), args.attention, args.plot)


if __name__ == "__main__":
    main()
