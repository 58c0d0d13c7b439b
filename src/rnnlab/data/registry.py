"""Registry of corpora: canonical URLs, the files each yields, and their sha256.

Checksums are those of the original text files (see each corpus's MANIFEST.md in the mirror).
Flickr8k's images are verified against ``images.tsv`` (itself checksummed) when they come from
the mirror; the canonical zip holds full-size originals, so there only the text files are
verified and images are validated by decoding in ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One canonical download: a plain file, a gzip'ed file, or an archive with members."""

    url: str
    kind: str  # "file" | "zip" | "tar"
    # archive member -> relative output path (for kind "file": {"": output path})
    members: dict[str, str]


@dataclass(frozen=True)
class Corpus:
    name: str
    task: str
    files: dict[str, str]  # relative path -> sha256
    sources: tuple[Source, ...]
    # Relative path of a TSV (file, ..., sha256) listing further files (images) to fetch/verify.
    file_manifest: str | None = None
    manifest_dir: str | None = None
    citation: str = ""
    extra: dict = field(default_factory=dict)


_GH = "https://raw.githubusercontent.com"

CORPORA: dict[str, Corpus] = {
    "ptb": Corpus(
        name="ptb",
        task="lm-word",
        files={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        sources=(
            Source(
                url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
                kind="tar",
                members={
                    "./simple-examples/data/ptb.train.txt": "ptb.train.txt",
                    "./simple-examples/data/ptb.valid.txt": "ptb.valid.txt",
                    "./simple-examples/data/ptb.test.txt": "ptb.test.txt",
                },
            ),
        ),
        citation="Marcus et al. 1993; Mikolov et al. 2010",
    ),
    "wikitext2": Corpus(
        name="wikitext2",
        task="lm-word",
        files={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        sources=(
            Source(
                url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                kind="zip",
                members={
                    "wikitext-2/wiki.train.tokens": "wiki.train.tokens",
                    "wikitext-2/wiki.valid.tokens": "wiki.valid.tokens",
                    "wikitext-2/wiki.test.tokens": "wiki.test.tokens",
                },
            ),
        ),
        citation="Merity et al. 2016",
    ),
    "tinyshakespeare": Corpus(
        name="tinyshakespeare",
        task="lm-char",
        files={"input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
        sources=(
            Source(
                url=f"{_GH}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                kind="file",
                members={"": "input.txt"},
            ),
        ),
        citation="Karpathy 2015 (char-rnn)",
    ),
    "multi30k": Corpus(
        name="multi30k",
        task="translation",
        files={
            "raw/train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
            "raw/train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
            "raw/val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
            "raw/val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
            "raw/test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
            "raw/test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
        },
        sources=tuple(
            Source(
                url=f"{_GH}/multi30k/dataset/master/data/task1/raw/{split}.{lang}.gz",
                kind="file",
                members={"": f"raw/{split}.{lang}.gz"},
            )
            for split in ("train", "val", "test_2016_flickr")
            for lang in ("en", "de")
        ),
        citation="Elliott et al. 2016",
    ),
    "flickr8k": Corpus(
        name="flickr8k",
        task="captioning",
        files={
            "Flickr8k.token.txt": "1e1f3a371ba1a1bf742e6930521c037e046b2bf3fcc2390ba8405e0301ed7689",
            "Flickr_8k.trainImages.txt": "e330ddd5156a4c2d2e2b67bc587e70e588f2d132bd8a10dc54dcb71e58115d8e",
            "Flickr_8k.devImages.txt": "18ba829f47f6df1cb830bf7f0506e2ddf333818925299babbd1bbcaf50fdc504",
            "Flickr_8k.testImages.txt": "c0924146c131458ceba45da59670fe9520eadce1e5cafffa16a817672a9b1f17",
        },
        sources=(
            Source(
                url="https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                kind="zip",
                members={
                    "Flickr8k.token.txt": "Flickr8k.token.txt",
                    "Flickr_8k.trainImages.txt": "Flickr_8k.trainImages.txt",
                    "Flickr_8k.devImages.txt": "Flickr_8k.devImages.txt",
                    "Flickr_8k.testImages.txt": "Flickr_8k.testImages.txt",
                },
            ),
            Source(
                url="https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                kind="zip",
                members={"Flicker8k_Dataset/": "images/"},  # a directory prefix: every image in it
            ),
        ),
        # In the mirror, images.tsv lists every image with its sha256 (checksummed itself below).
        file_manifest="images.tsv",
        manifest_dir="images",
        extra={"file_manifest_sha256": "8204293fd1e7a2cbce3cb57eb8f78a84483bae13d5a2d1e2f463b1cc0ec2605a"},
        citation="Hodosh, Young & Hockenmaier 2013",
    ),
}


def get_corpus(name: str) -> Corpus:
    from rnnlab.errors import ConfigError

    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; valid names: {sorted(CORPORA)}")
    return CORPORA[name]
