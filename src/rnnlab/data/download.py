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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from rnnlab.data.corpora import CorpusSpec, FileSpec
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
    origin: str  # "mirror", "url" or "local" (every file from a local path)
    files: int
    fetched: int
    already_present: int
    local_sha256: dict[str, str] = field(default_factory=dict)  # name -> sha256 of files from a `path`


def _spec(corpus: str | CorpusSpec) -> CorpusSpec:
    if isinstance(corpus, CorpusSpec):
        return corpus
    from rnnlab.data.corpora import get, repo_corpora

    return get(repo_corpora(), corpus, "download.corpora")


def fetch_corpus(
    corpus: str | CorpusSpec,
    out_root: Path,
    mirror: Path | None,
    retries: int = 3,
    timeout_s: float = 60.0,
    progress: bool = True,
    repo_root: Path = Path("."),
    locked: dict[str, str] | None = None,
) -> FetchReport:
    """Fetch one declared corpus into ``out_root/<name>``: local ``path`` files from the repository
    (checked against ``locked``, the sha256 recorded by an earlier run), URL files from the mirror
    when it has ``<name>/``, else from their URLs; every file with a sha256 verified."""
    spec = _spec(corpus)
    out_dir = Path(out_root) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    local = {n: f for n, f in spec.files.items() if f.path is not None}
    remote = {n: f for n, f in spec.files.items() if f.url is not None}
    local_report = _fetch_local(spec, local, out_dir, Path(repo_root), locked or {})
    if not remote:
        return local_report
    if mirror is not None and (mirror / spec.name).is_dir():
        r = _fetch_from_mirror(spec, remote, mirror / spec.name, out_dir, progress)
    else:
        if mirror is not None:
            log.warning("mirror %s has no %s/; trying the canonical URLs", mirror, spec.name)
        r = _fetch_from_urls(spec, remote, out_dir, mirror, retries, timeout_s, progress)
    r.files += local_report.files
    r.fetched += local_report.fetched
    r.already_present += local_report.already_present
    r.local_sha256 = local_report.local_sha256
    return r


def _fetch_local(
    spec: CorpusSpec, files: dict[str, FileSpec], out_dir: Path, repo_root: Path, locked: dict[str, str]
) -> FetchReport:
    shas, fetched, present = {}, 0, 0
    expanded = []
    for name, f in files.items():
        where = f"corpora.{spec.name}.files.{name}"
        if not f.path.endswith("/"):
            expanded.append((name, f, where))
            continue
        folder = repo_root / f.path
        if not folder.is_dir():
            raise DownloadError(f"{where}.path: {folder}: no such folder (a path is relative to the repository root)")
        for p in sorted(folder.iterdir()):  # a folder (photos): every file in it, each checked by the lock
            if p.is_file():
                rel = f"{name.rstrip('/')}/{p.name}"
                expanded.append((rel, FileSpec(path=f"{f.path}{p.name}"), f"{where} ({p.name})"))
    for name, f, where in expanded:
        src = repo_root / f.path
        if not src.is_file():
            raise DownloadError(f"{where}.path: {src}: file not found (a path is relative to the repository root)")
        if not os.access(src, os.R_OK):
            raise DownloadError(f"{where}.path: {src}: file not readable")
        found = sha256_file(src)
        for expected, what in ((f.sha256, "params.yaml"), (locked.get(name), "data/corpora.lock.json")):
            if expected is not None and expected != found:
                raise DownloadError(
                    f"{where}: {src} changed: expected sha256 {expected} (recorded in {what}), found {found}. "
                    f"If the change is intended, update {where}.sha256 or delete the entry from {what}"
                )
        shas[name] = found
        dst = out_dir / name
        if _is_verified(dst, found):
            present += 1
            continue
        _atomic_copy(src, dst, found)
        fetched += 1
    return FetchReport(spec.name, "local", len(expanded), fetched, present, shas)


def _fetch_from_mirror(
    spec: CorpusSpec, files: dict[str, FileSpec], src_dir: Path, out_dir: Path, progress: bool
) -> FetchReport:
    fetched = present = total = 0
    for rel, f in files.items():
        if f.is_folder:
            continue
        total += 1
        src, dst = src_dir / rel, out_dir / rel
        if not src.is_file():
            raise DownloadError(f"mirror {src_dir}: file {rel} of corpus {spec.name} is missing")
        if _is_verified(dst, f.sha256):
            present += 1
            continue
        _atomic_copy(src, dst, f.sha256)
        fetched += 1
    for rel, f in files.items():
        if not f.is_folder:
            continue
        folder = rel.rstrip("/")
        if f.manifest and (src_dir / f.manifest).is_file():
            if not _is_verified(out_dir / f.manifest, f.manifest_sha256):
                _atomic_copy(src_dir / f.manifest, out_dir / f.manifest, f.manifest_sha256)
            listed = sorted(_read_file_manifest(out_dir / f.manifest).items())
        else:
            # A mirror made from the canonical archive (scripts/fetch_corpora.py) has no manifest:
            # its files are taken as they are and validated by decoding in prepare, as from the URL.
            log.warning("mirror %s: no manifest for %s/; copying it unverified", src_dir, folder)
            listed = sorted((p.name, None) for p in (src_dir / folder).iterdir() if p.is_file())
        for fname, sha in tqdm(listed, desc=f"{spec.name} files", disable=not progress):
            src, dst = src_dir / folder / fname, out_dir / folder / fname
            total += 1
            if not src.is_file():
                raise DownloadError(f"mirror {src_dir}: {folder}/{fname} listed in {f.manifest} is missing")
            if _is_verified(dst, sha):
                present += 1
                continue
            _atomic_copy(src, dst, sha)
            fetched += 1
    return FetchReport(spec.name, "mirror", total, fetched, present)


def _fetch_from_urls(
    spec: CorpusSpec,
    files: dict[str, FileSpec],
    out_dir: Path,
    mirror: Path | None,
    retries: int,
    timeout_s: float,
    progress: bool,
) -> FetchReport:
    plain = {rel: f for rel, f in files.items() if not f.is_folder}
    # A folder from an archive has no per-file checksums: one already extracted (non-empty) is kept.
    folders_done = all(
        (out_dir / rel).is_dir() and any((out_dir / rel).iterdir()) for rel, f in files.items() if f.is_folder
    )
    if all(_is_verified(out_dir / rel, f.sha256) for rel, f in plain.items()) and folders_done:
        return FetchReport(spec.name, "url", len(plain), 0, len(plain))
    by_url: dict[str, list[tuple[str, FileSpec]]] = {}
    for rel, f in files.items():
        by_url.setdefault(f.url, []).append((rel, f))
    fetched = 0
    with tempfile.TemporaryDirectory(prefix=f"rnnlab-{spec.name}-") as tmp:
        for url, entries in by_url.items():
            try:
                fetched += _fetch_source(url, entries, out_dir, Path(tmp), retries, timeout_s, progress)
            except DownloadError as exc:
                where = f"mirror {mirror} has no {spec.name}/" if mirror else "no mirror is set"
                raise DownloadError(
                    f"corpus {spec.name}: {exc}. Offline? ({where}) Point a mirror laid out as "
                    f"<mirror>/{spec.name}/<file> with params download.mirror or {MIRROR_ENV}=/path/to/corpora"
                ) from exc
    for rel, f in plain.items():
        path = out_dir / rel
        if not path.is_file():
            raise DownloadError(f"corpus {spec.name}: {rel} missing after download")
        actual = sha256_file(path)
        if actual != f.sha256:
            path.unlink()
            raise DownloadError(
                f"corpora.{spec.name}.files.{rel}: downloaded from {f.url}: expected sha256 {f.sha256}, "
                f"found {actual}; file removed"
            )
    return FetchReport(spec.name, "url", len(plain), fetched, 0)


def _fetch_source(
    url: str,
    entries: list[tuple[str, FileSpec]],
    out_dir: Path,
    tmp: Path,
    retries: int,
    timeout_s: float,
    progress: bool,
) -> int:
    kinds = {f.archive for _, f in entries}
    if kinds == {None}:
        for rel, _ in entries:
            download_url(url, out_dir / rel, retries=retries, timeout_s=timeout_s, progress=progress)
        return len(entries)
    if len(kinds) != 1:
        raise DownloadError(f"{url}: declared both as an archive and as a plain file")
    archive = tmp / Path(url).name
    download_url(url, archive, retries=retries, timeout_s=timeout_s, progress=progress)
    members = {f.member: rel for rel, f in entries}
    return len(safe_extract(archive, kinds.pop(), members, out_dir))
