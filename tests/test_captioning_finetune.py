"""Fine-tuning the image encoder with the caption decoder (train_captioner ``finetune_blocks``).

On a handful of real Flickr8k images from the mirror: the encoder's blocks compose to the encoder,
only the last N blocks train (from ImageNet, with their own learning rate) and lower the loss by
themselves, and the saved checkpoint, ``rnnlab caption``'s path and the MLflow pyfunc all decode
with the fine-tuned blocks.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from rnnlab.data.captions import CaptionDataModule, read_flickr8k
from rnnlab.data.images import load_image
from rnnlab.errors import ConfigError
from rnnlab.features import extract_features
from rnnlab.io import read_json
from rnnlab.models.image_encoder import build_image_encoder, encoder_blocks, split_encoder
from rnnlab.resume import load_checkpoint_file
from rnnlab.stages.train import train_stage
from rnnlab.tasks.base import StagePaths
from rnnlab.tasks.captioning import (
    CaptioningTask,
    ImageCaptioner,
    caption_images,
    encoder_tail,
    load,
    parse_run,
    prefix_cache,
    score,
)

SPLIT_SIZES = {"train": 4, "dev": 2, "test": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flickr(mirror) -> Path:
    return mirror / "flickr8k"


@pytest.fixture(scope="module")
def subset(flickr) -> pd.DataFrame:
    table, _ = read_flickr8k(flickr)
    keep = []
    for split, n in SPLIT_SIZES.items():
        keep += list(table[table.split == split].image.drop_duplicates().head(n))
    return table[table.image.isin(keep)].reset_index(drop=True)


@pytest.fixture(scope="module")
def features(tmp_path_factory, flickr, subset) -> Path:
    """The frozen cache (train_captioner reads which images it has from its index)."""
    out = tmp_path_factory.mktemp("features")
    names = sorted(subset.image.unique())
    extract_features(flickr / "images", names, out / "features.npy", out / "features.json", batch_size=4, num_workers=0)
    return out


def test_prefix_then_tail_is_the_encoder(flickr, subset):
    encoder = build_image_encoder("efficientnet_lite0")
    assert len(encoder_blocks(encoder)) == 18  # stem, 16 MBConv blocks, head
    image = load_image(flickr / "images" / subset.image.iloc[0]).unsqueeze(0)
    x = encoder.normalize(image)
    with torch.no_grad():
        whole = encoder(x)  # [1, 1280, 7, 7]
        whole = whole.permute(0, 2, 3, 1).reshape(1, 49, 1280)
        for n, prefix_channels in ((1, 320), (2, 192), (18, 3), (-1, 3)):
            prefix, tail = split_encoder(encoder, n)
            maps = prefix(x)
            assert maps.size(1) == prefix.out_channels == prefix_channels
            flat = maps.permute(0, 2, 3, 1).reshape(1, -1, maps.size(1))
            assert torch.equal(tail(flat), whole), n
    with pytest.raises(ConfigError, match="has 18 blocks"):
        split_encoder(encoder, 19)


def test_only_the_encoder_blocks_training_lower_the_loss(flickr, subset):
    """Decoder lr 0: whatever the loss gains comes through the fine-tuned blocks."""
    torch.manual_seed(0)
    train = subset[subset.split != "test"]
    cache = prefix_cache("efficientnet_lite0", 2, flickr / "images", sorted(train.image.unique()))
    assert cache[0].shape == (6, 49, 192) and cache[0].dtype.name == "float16"  # block 16's input
    data = CaptionDataModule(train, "unused.npy", batch_size=4, min_freq=1, max_len=12, features=cache)
    data.setup()
    task = CaptioningTask(
        "soft_attention",
        len(data.vocab),
        1280,
        embedding_size=16,
        hidden_size=32,
        attention_size=16,
        dropout=0.0,
        finetune_blocks=2,
        encoder_lr=1e-3,
        vocab=data.vocab,
    )
    pretrained = encoder_tail("efficientnet_lite0", 2, pretrained=True).state_dict()
    task.encoder_tail.load_state_dict(pretrained)
    optimizer = task.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [task.hparams.lr, 1e-3]
    optimizer.param_groups[0]["lr"] = 0.0
    decoder_before = {k: v.clone() for k, v in task.model.state_dict().items()}
    batch = next(iter(data.train_dataloader()))
    task.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        total, _, _ = task._losses(batch)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(v, decoder_before[k]) for k, v in task.model.state_dict().items())
    after = task.encoder_tail.state_dict()
    moved = [k for k in pretrained if not torch.equal(after[k], pretrained[k])]
    assert moved and all(k.endswith(("weight", "bias")) for k in moved)
    assert all(torch.equal(after[k], pretrained[k]) for k in pretrained if "running" in k)  # BN stats stay


def _train(config: dict, subset: pd.DataFrame, features: Path, root: Path, raw: Path) -> tuple[dict, dict]:
    prepared = root / "prepared"
    (prepared / "flickr8k").mkdir(parents=True, exist_ok=True)
    subset.to_parquet(prepared / "flickr8k" / "captions.parquet")
    params = {
        "seed": 7,
        "tracking": {"enabled": False},
        "trainer": {"num_threads": 1},
        "train_captioner": {"defaults": {}, "runs": {"run": config}},
    }
    paths = StagePaths(prepared=prepared, features=features, raw=raw)
    row = train_stage(
        params,
        "train_captioner",
        "run",
        paths,
        root / "models",
        root / "metrics.json",
        root / "plots.json",
        root / "ck",
    )
    return row, read_json(root / "models" / "run" / "metrics.json")


def test_finetuned_run_saves_and_serves_its_own_encoder_blocks(features, subset, flickr, tmp_path):
    config = {
        "decoder": "soft_attention",
        "embedding_size": 16,
        "hidden_size": 32,
        "attention_size": 16,
        "batch_size": 2,
        "max_epochs": 1,
        "min_freq": 1,
        "max_len": 12,
        "beam_sizes": [1, 2],
        "grid_images": 0,
        "coco_metrics": False,
        "lr": 3e-3,
        "finetune_blocks": 2,
        "encoder_lr": 1e-4,
    }
    row, metrics = _train(config, subset, features, tmp_path / "a", flickr.parent)
    assert metrics["steps"] == 2 and metrics["prefix_cache_seconds"] > 0
    model = Path(metrics["artifacts"]["model"])

    # The checkpoint holds the last 2 blocks (block 16 and the head), trained from ImageNet: every
    # weight moved, by a fine-tuning step's size (a random start would be far off), BN statistics not.
    state = load_checkpoint_file(model)["state_dict"]
    saved = {k[len("encoder_tail.") :]: v for k, v in state.items() if k.startswith("encoder_tail.")}
    pretrained = encoder_tail("efficientnet_lite0", 2, pretrained=True).state_dict()
    assert set(saved) == set(pretrained) and {k.split(".")[1] for k in saved} == {"0", "1"}
    for key, value in pretrained.items():
        if "running" in key or key.endswith("num_batches_tracked"):
            assert torch.equal(saved[key], value), key
        else:
            change = (saved[key] - value).abs().max().item()
            assert 0 < change < 0.01, (key, change)

    # Reloaded from the folder (score: the frozen prefix over the test images, then the saved blocks),
    # the test images decode to the numbers the run reported.
    paths = StagePaths(prepared=tmp_path / "a" / "prepared", features=features, raw=flickr.parent)
    again = score(model.parent, paths, beam_sizes=(1, 2))
    for setting in ("greedy", "beam2"):
        for key in ("bleu1", "bleu2", "sacrebleu", "mean_length"):
            assert again[setting][key] == metrics["test"][setting][key], (setting, key)

    # A new image file (rnnlab caption's path, and the MLflow pyfunc's) goes through the frozen
    # prefix and the checkpoint's blocks: the same caption and score as the prefix cache gives.
    task = load(model)
    test_images = sorted(subset[subset.split == "test"].image.unique())
    cache, _ = prefix_cache("efficientnet_lite0", 2, flickr / "images", test_images)
    expected = task.caption(torch.from_numpy(cache).float(), beam_size=1)
    captioner = ImageCaptioner(model)
    images = [load_image(flickr / "images" / n) for n in test_images]
    # The frozen prefix, unchanged (its own image-file path: float16 rounding may differ by 1 ulp).
    torch.testing.assert_close(captioner.features(images), torch.from_numpy(cache).float(), rtol=2e-3, atol=2e-3)
    got = captioner.module.caption(captioner.features(images), beam_size=1)
    assert got.tokens == expected.tokens and got.scores == pytest.approx(expected.scores, abs=1e-3)
    texts = caption_images(model, [flickr / "images" / n for n in test_images], beam_size=1)
    assert texts == expected.texts(task.tokenizer)

    from rnnlab.serving import CaptionerPyfunc, encode_image

    pyfunc = CaptionerPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(model)}, model_config={"beam": 1}))
    served = pyfunc.predict(None, pd.DataFrame({"image": [encode_image(flickr / "images" / n) for n in test_images]}))
    assert list(served["caption"]) == texts

    # With ImageNet's blocks instead of the fine-tuned ones the same decoder scores differently.
    task.encoder_tail.load_state_dict(pretrained)
    assert task.caption(torch.from_numpy(cache).float(), beam_size=1).scores != pytest.approx(expected.scores, abs=1e-6)


def test_bad_finetune_keys_name_the_key(features, subset, flickr, tmp_path):
    with pytest.raises(ConfigError, match=r"train_captioner\.finetune_blocks.*-2"):
        parse_run({"finetune_blocks": -2})
    with pytest.raises(ConfigError, match=r"train_captioner\.encoder_lr"):
        parse_run({"encoder_lr": 0})
    with pytest.raises(ConfigError, match=r"runs\.run\.finetune_blocks: .*efficientnet_lite0 has 18 blocks"):
        _train({"finetune_blocks": 19, "coco_metrics": False}, subset, features, tmp_path, flickr.parent)
