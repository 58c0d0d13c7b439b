"""Stage ``download``: fetch corpora from a local mirror or their canonical URLs, verified.

Guarantees: no partial file ever sits at a final path (write ``*.part``, verify sha256, rename);
files already present with the right checksum are not fetched again; archives whose members
have absolute paths or ``..`` are refused; offline without a mirror gives an error naming the
corpus, the URL tried and how to set a mirror.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from rnnlab.data.registry import Corpus, Source, get_corpus
from rnnlab.errors import DownloadError

log = logging.getLogger(__name__)
MIRROR_ENV = "RNNLAB_MIRROR"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_mirror(param_value: str | None) -> Path | None:
    """``RNNLAB_MIRROR`` overrides the ``download.mirror`` param; empty string disables the mirror."""
    value = os.environ.get(MIRROR_ENV, param_value)
    if not value:
        return None
    return Path(value).expanduser()


def _atomic_copy(src: Path, dst: Path, sha256: str | None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    part.unlink(missing_ok=True)
    shutil.copyfile(src, part)
    _accept(part, dst, sha256, origin=str(src))


def _accept(part: Path, dst: Path, sha256: str | None, origin: str) -> None:
    """Verify the temp file's checksum and move it into place, or delete it and fail."""
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{dst}: checksum mismatch for the copy from {origin}: expected sha256 {sha256}, got {actual}"
            )
    os.replace(part, dst)


def _is_verified(path: Path, sha256: str | None) -> bool:
    return path.is_file() and (sha256 is None or sha256_file(path) == sha256)


def download_url(
    url: str, dst: Path, retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 60.0, progress: bool = True
) -> None:
    """Stream ``url`` to ``dst.part`` with retries and exponential backoff; rename when complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        part.unlink(missing_ok=True)  # never resume from a stale partial file
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress) as bar:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            os.replace(part, dst)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = exc
            part.unlink(missing_ok=True)
            if attempt < retries:
                wait = backoff_s * 2 ** (attempt - 1)
                log.warning("download %s failed (%s); retry %d/%d in %.1fs", url, exc, attempt, retries, wait)
                time.sleep(wait)
    raise DownloadError(f"could not fetch {url} after {retries} attempts: {last_error}")


def _check_member_name(name: str, archive: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"{archive}: refusing archive member {name!r} (absolute path or '..')")


def safe_extract(archive: Path, kind: str, members: dict[str, str], out_dir: Path) -> list[Path]:
    """Extract the wanted members (a key ending in '/' selects a whole directory).

    Every member name in the archive is checked first; one unsafe name refuses the archive.
    Links and devices are refused too. Each file goes through a ``.part`` file and a rename.
    """
    written: list[Path] = []
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{archive}: corrupt zip archive: {exc}") from exc
        infos = zf.infolist()
        for info in infos:
            try:
                _check_member_name(info.filename, archive)
            except DownloadError:
                zf.close()
                raise
        entries = [(i.filename, i) for i in infos if not i.is_dir()]
        opener = zf.open
    elif kind == "tar":
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError as exc:
            raise DownloadError(f"{archive}: corrupt tar archive: {exc}") from exc
        tar_members = tf.getmembers()
        for m in tar_members:
            if m.issym() or m.islnk() or m.isdev() or ".." in PurePosixPath(m.name).parts or m.name.startswith("/"):
                tf.close()
            _check_member_name(m.name, archive)
            if m.issym() or m.islnk() or m.isdev():
                raise DownloadError(f"{archive}: refusing link or device member {m.name!r}")
        entries = [(m.name, m) for m in tar_members if m.isfile()]
        opener = tf.extractfile
    else:
        raise DownloadError(f"{archive}: unknown archive kind {kind!r}")
    try:
        for name, handle in entries:
            target = None
            for want, rel in members.items():
                if want.endswith("/") and name.startswith(want):
                    target = out_dir / rel / name[len(want) :]
                elif name == want:
                    target = out_dir / rel
            if target is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            with opener(handle) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            os.replace(part, target)
            written.append(target)
    finally:
        (zf if kind == "zip" else tf).close()
    missing = [m for m in members if not m.endswith("/") and not any(str(w).endswith(members[m]) for w in written)]
    if missing:
        raise DownloadError(f"{archive}: expected members not found: {missing}")
    return written


def _read_file_manifest(path: Path) -> dict[str, str]:
    """``images.tsv``: columns file, ..., sha256 -> {file: sha256}."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if not reader.fieldnames or "file" not in reader.fieldnames or "sha256" not in reader.fieldnames:
            raise DownloadError(f"{path}: expected a TSV header with 'file' and 'sha256' columns")
        return {row["file"]: row["sha256"] for row in reader}


@dataclass
class FetchReport:
    corpus: str
    origin: str  # "mirror" or "url"
    files: int
    fetched: int
    already_present: int


def fetch_corpus(
    name: str, out_root: Path, mirror: Path | None, retries: int = 3, timeout_s: float = 60.0, progress: bool = True
) -> FetchReport:
    corpus = get_corpus(name)
    out_dir = Path(out_root) / corpus.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if mirror is not None and (mirror / corpus.name).is_dir():
        return _fetch_from_mirror(corpus, mirror / corpus.name, out_dir, progress)
    if mirror is not None:
        log.warning("mirror %s has no %s/; trying the canonical URLs", mirror, corpus.name)
    return _fetch_from_urls(corpus, out_dir, mirror, retries, timeout_s, progress)


def _fetch_from_mirror(corpus: Corpus, src_dir: Path, out_dir: Path, progress: bool) -> FetchReport:
    wanted: dict[str, str | None] = dict(corpus.files)
    if corpus.file_manifest:
        wanted[corpus.file_manifest] = corpus.extra["file_manifest_sha256"]
    fetched = present = 0
    for rel, sha in wanted.items():
        src, dst = src_dir / rel, out_dir / rel
        if not src.is_file():
            raise DownloadError(f"mirror {src_dir}: file {rel} of corpus {corpus.name} is missing")
        if _is_verified(dst, sha):
            present += 1
            continue
        _atomic_copy(src, dst, sha)
        fetched += 1
    if corpus.file_manifest:
        manifest = _read_file_manifest(out_dir / corpus.file_manifest)
        for fname, sha in tqdm(sorted(manifest.items()), desc=f"{corpus.name} files", disable=not progress):
            rel = f"{corpus.manifest_dir}/{fname}"
            src, dst = src_dir / rel, out_dir / rel
            if not src.is_file():
                raise DownloadError(f"mirror {src_dir}: {rel} listed in {corpus.file_manifest} is missing")
            if _is_verified(dst, sha):
                present += 1
                continue
            _atomic_copy(src, dst, sha)
            fetched += 1
        wanted.update({f"{corpus.manifest_dir}/{f}": s for f, s in manifest.items()})
    return FetchReport(corpus.name, "mirror", len(wanted), fetched, present)


def _fetch_from_urls(
    corpus: Corpus, out_dir: Path, mirror: Path | None, retries: int, timeout_s: float, progress: bool
) -> FetchReport:
    if all(_is_verified(out_dir / rel, sha) for rel, sha in corpus.files.items()) and not corpus.manifest_dir:
        return FetchReport(corpus.name, "url", len(corpus.files), 0, len(corpus.files))
    fetched = 0
    with tempfile.TemporaryDirectory(prefix=f"rnnlab-{corpus.name}-") as tmp:
        for source in corpus.sources:
            try:
                fetched += _fetch_source(source, out_dir, Path(tmp), retries, timeout_s, progress)
            except DownloadError as exc:
                where = f"mirror {mirror} has no {corpus.name}/" if mirror else "no mirror is set"
                raise DownloadError(
                    f"corpus {corpus.name}: {exc}. Offline? ({where}) Point a mirror laid out as "
                    f"<mirror>/{corpus.name}/<file> with params download.mirror or {MIRROR_ENV}=/path/to/corpora"
                ) from exc
    for rel, sha in corpus.files.items():
        path = out_dir / rel
        if not path.is_file():
            raise DownloadError(f"corpus {corpus.name}: {rel} missing after download")
        actual = sha256_file(path)
        if actual != sha:
            path.unlink()
            raise DownloadError(f"corpus {corpus.name}: {rel}: expected sha256 {sha}, got {actual}; file removed")
    return FetchReport(corpus.name, "url", len(corpus.files), fetched, 0)


def _fetch_source(source: Source, out_dir: Path, tmp: Path, retries: int, timeout_s: float, progress: bool) -> int:
    if source.kind == "file":
        (rel,) = source.members.values()
        download_url(source.url, out_dir / rel, retries=retries, timeout_s=timeout_s, progress=progress)
        return 1
    archive = tmp / Path(source.url).name
    download_url(source.url, archive, retries=retries, timeout_s=timeout_s, progress=progress)
    return len(safe_extract(archive, source.kind, source.members, out_dir))
