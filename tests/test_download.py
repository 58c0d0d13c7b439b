import io
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from rnnlab.data import download
from rnnlab.data.corpora import repo_corpora
from rnnlab.data.download import fetch_corpus, safe_extract, sha256_file
from rnnlab.errors import DownloadError


def test_mirror_copy_is_verified_and_idempotent(tmp_path, mirror):
    report = fetch_corpus("ptb", tmp_path, mirror, progress=False)
    assert (report.origin, report.files, report.fetched) == ("mirror", 3, 3)
    for rel, f in repo_corpora()["ptb"].files.items():
        assert sha256_file(tmp_path / "ptb" / rel) == f.sha256
    again = fetch_corpus("ptb", tmp_path, mirror, progress=False)
    assert (again.fetched, again.already_present) == (0, 3)


def test_tampered_mirror_copy_is_rejected(tmp_path, mirror):
    fake = tmp_path / "mirror" / "ptb"
    shutil.copytree(mirror / "ptb", fake)
    fake.joinpath("ptb.valid.txt").chmod(0o644)
    with fake.joinpath("ptb.valid.txt").open("a") as fh:
        fh.write(" tampered\n")
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"ptb.valid.txt: checksum mismatch.*expected sha256 c9fe69"):
        fetch_corpus("ptb", out, tmp_path / "mirror", progress=False)
    assert not (out / "ptb" / "ptb.valid.txt").exists()
    assert not list((out / "ptb").glob("*.part"))


def test_offline_without_mirror_names_corpus_url_and_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError) as info:
        fetch_corpus("tinyshakespeare", tmp_path, None, retries=2, progress=False)
    msg = str(info.value)
    assert "corpus tinyshakespeare" in msg
    assert repo_corpora()["tinyshakespeare"].files["input.txt"].url in msg
    assert "RNNLAB_MIRROR" in msg and "download.mirror" in msg
    assert not any(tmp_path.rglob("*.part"))


def test_interrupted_download_leaves_no_file_and_next_run_starts_clean(tmp_path, monkeypatch):
    payload = (Path(__file__).parent / "conftest.py").read_bytes()

    class Broken(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def read(self, n=-1):
            chunk = super().read(16)
            if self.tell() > 32:
                raise ConnectionResetError("connection reset mid-transfer")
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Good(Broken):
        def read(self, n=-1):
            return io.BytesIO.read(self, n)

    dst = tmp_path / "file.txt"
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: Broken(payload))
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError, match="after 2 attempts"):
        download.download_url("http://example.invalid/f", dst, retries=2, progress=False)
    assert not dst.exists() and not dst.with_name("file.txt.part").exists()
    # A stale partial file from a killed process is discarded, never resumed.
    dst.with_name("file.txt.part").write_bytes(b"stale")
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: Good(payload))
    download.download_url("http://example.invalid/f", dst, retries=1, progress=False)
    assert dst.read_bytes() == payload
    assert not dst.with_name("file.txt.part").exists()


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/etc/evil.txt", "data/../../evil.txt"])
def test_archive_with_unsafe_member_is_refused(tmp_path, bad_name):
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(bad_name, "evil")
    with pytest.raises(DownloadError, match="refusing archive member"):
        safe_extract(zpath, "zip", {"ok.txt": "ok.txt"}, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()

    tpath = tmp_path / "bad.tar"
    with tarfile.open(tpath, "w") as tf:
        data = b"evil"
        info = tarfile.TarInfo(bad_name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DownloadError, match="refusing archive member"):
        safe_extract(tpath, "tar", {"ok.txt": "ok.txt"}, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_archive_extraction_of_wanted_members(tmp_path):
    zpath = tmp_path / "good.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("wikitext-2/wiki.train.tokens", "a b c\n")
        zf.writestr("imgs/a.jpg", "x")
        zf.writestr("imgs/b.jpg", "y")
    written = safe_extract(
        zpath, "zip", {"wikitext-2/wiki.train.tokens": "wiki.train.tokens", "imgs/": "images/"}, tmp_path / "out"
    )
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "images/a.jpg",
        "images/b.jpg",
        "wiki.train.tokens",
    ]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DownloadError, match="broken.zip: corrupt zip archive"):
        safe_extract(bad, "zip", {"a": "a"}, tmp_path / "out")


def test_env_mirror_overrides_param(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNLAB_MIRROR", str(tmp_path))
    assert download.resolve_mirror("../shared/corpora") == tmp_path
    monkeypatch.setenv("RNNLAB_MIRROR", "")
    assert download.resolve_mirror("../shared/corpora") is None
