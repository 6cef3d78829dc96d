"""``gptlab prepare``: text -> train/val token shards plus ``meta.json`` (tokenizer spec, counts, provenance).

Sources (any mix, in the order given): a named corpus (``shakespeare``, ``tinyshakespeare``), a text file, a folder
(every file inside, recursively, in sorted order), a ``.jsonl`` file (one document per line, from ``--field``), a
``.parquet`` file (one document per row of column ``--field``; needs ``pyarrow``), or an http(s) URL to any of these.

Each file, JSONL line or parquet row is one document; documents are joined with the tokenizer's end-of-text id. The
token stream is split deterministically: the first ``1 - val_fraction`` of it (in source order) is train, the rest
val. Tokenization runs through the tokenizers' own parallel batch encoders (tiktoken and HF tokenizers use all
cores).

The output folder is never anything but a gptlab dataset: ``prepare`` refuses to write into a file, into a folder
that holds anything other than an earlier dataset (its ``meta.json`` says ``gptlab-tokens``), or over one of its
own inputs. The new dataset is built beside the target and swapped in atomically (:func:`gptlab.files.replace_dir`),
so at every instant either the old or the new dataset is in place; a lock (``.<name>.lock`` beside it) refuses a
second ``prepare`` of the same folder, and the next run removes what a killed one left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import assets
from ..errors import GptlabError
from ..files import (
    atomic_write_text,
    dataset_files,
    entries,
    folder_lock,
    read_input,
    recover,
    remove_leftovers,
    replace_dir,
    some,
)
from ..tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from .config import PrepareConfig
from .corpora import CORPORA, load_corpus
from .jsonl import decode_text, jsonl_records
from .shards import token_dtype, write_shard

TEXT_SUFFIXES_SKIPPED = {".bin", ".gz", ".zip", ".png", ".jpg", ".pdf", ".pt", ".safetensors"}


def _jsonl_docs(data: bytes, origin: str, field: str) -> Iterator[tuple[str, str]]:
    for n, obj in jsonl_records(data, origin):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise GptlabError(f"{origin} line {n} has no string field {field!r}; choose the field with --field")
        yield f"{origin}:{n}", obj[field]


def _parquet_docs(path: Path, field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq  # optional (the parquet extra): only parquet sources need it
    except ImportError:
        raise GptlabError(f"reading {path} needs pyarrow; install it with `pip install 'gptlab[parquet]'`") from None
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise GptlabError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    if field not in table.column_names:
        raise GptlabError(f"{path} has no column {field!r} (columns: {table.column_names}); choose it with --field")
    for n, text in enumerate(table.column(field).to_pylist()):
        if not isinstance(text, str):
            raise GptlabError(f"{path} row {n} of column {field!r} is not a string")
        yield f"{path}:{n}", text


def _file_docs(path: Path, field: str, origin: str | None = None) -> Iterator[tuple[str, str]]:
    origin = origin or str(path)
    if path.suffix == ".parquet":
        yield from _parquet_docs(path, field)
        return
    data = read_input(path, "the source")
    if path.suffix == ".jsonl":
        yield from _jsonl_docs(data, origin, field)
    else:
        yield origin, decode_text(data, origin)


def iter_documents(sources: list[str], field: str, downloads: Path) -> Iterator[tuple[str, str]]:
    """(origin, text) for every document of every source, in order. URLs are downloaded once into ``downloads``."""
    for src in sources:
        if src in CORPORA:
            yield from load_corpus(src)
        elif src.startswith(("http://", "https://")):
            local = downloads / (str(abs(hash(src))) + "_" + src.rstrip("/").rsplit("/", 1)[-1])
            if not local.exists():
                local.write_bytes(assets.fetch_url(src))
            yield from _file_docs(local, field, origin=src)
        else:
            path = Path(src)
            if path.is_dir():
                files = sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not p.name.startswith(".") and p.suffix not in TEXT_SUFFIXES_SKIPPED
                )
                if not files:
                    raise GptlabError(f"folder {path} holds no text files")
                for f in files:
                    yield from _file_docs(f, field)
            else:
                yield from _file_docs(path, field)


def make_tokenizer(kind: str, texts: Iterator[str], vocab_size: int | None, model: str | None = None) -> Tokenizer:
    """The dataset's tokenizer: a model's (``model``, any source the loader reads), or one of ``kind``."""
    if model is not None:
        from ..loader import load_model

        return load_model(model, "cpu").tokenizer
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        if not vocab_size:
            raise GptlabError("a trained BPE tokenizer needs --vocab-size (e.g. 4096)")
        return BPETokenizer.train(texts, vocab_size)
    raise GptlabError(f"unknown tokenizer {kind!r}; choose gpt2, char or bpe")


def prepare(
    sources: list[str],
    out_dir: str | Path,
    tokenizer: str = PrepareConfig.tokenizer,
    vocab_size: int | None = None,
    val_fraction: float = PrepareConfig.val_fraction,
    field: str = PrepareConfig.field,
    tokenizer_from: str | None = None,
    shard_tokens: int = 100_000_000,
    batch_bytes: int = 4 << 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into ``out_dir`` (``train_000.bin``..., ``val_000.bin``..., ``meta.json``)."""
    if not sources:
        raise GptlabError("no sources given; name a file, folder, URL or corpus (e.g. `gptlab prepare shakespeare`)")
    if not 0.0 < val_fraction < 1.0:
        raise GptlabError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    for src in sources:
        if src not in CORPORA and not src.startswith(("http://", "https://")) and not Path(src).exists():
            raise GptlabError(f"source {src!r} is not a file, folder, URL or named corpus ({', '.join(CORPORA)})")
    meta = write_dataset(
        Path(out_dir),
        sources,
        lambda tmp: _build(
            sources,
            tmp,
            tokenizer,
            vocab_size,
            val_fraction,
            field,
            shard_tokens,
            batch_bytes,
            progress,
            tokenizer_from,
        ),
    )
    meta.pop("tokenizer")
    return meta


def prepare_images(
    source: str,
    out_dir: str | Path,
    images: int = PrepareConfig.images,
    image_size: int = PrepareConfig.image_size,
    seed: int = PrepareConfig.seed,
):
    """``gptlab prepare shapes|digits``: an image-text dataset (:mod:`gptlab.data.images`) in ``out_dir``."""
    from . import images as vision_data

    def build(tmp: Path) -> dict[str, Any]:
        made = (
            vision_data.build_shapes(images, image_size, seed) if source == "shapes" else vision_data.build_digits(seed)
        )
        (tmp / "out").mkdir()
        return vision_data.write_image_dataset(tmp / "out", source, made["splits"], made["info"], seed)

    meta = write_dataset(Path(out_dir), [], build)
    return {k: v for k, v in meta.items() if k not in ("tokenizer", "files", "questions", "answers")}


def write_dataset(out_dir: Path, sources: list[str], build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build(tmp)``, which writes a dataset into ``tmp / "out"`` and returns its metadata, then swap it in as
    ``out_dir`` (see the module docstring: locked, checked, atomic, leftovers of killed runs removed)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with folder_lock(out_dir.parent / f".{out_dir.name}.lock", f"dataset folder {out_dir}"):
        recover(out_dir)  # a run killed mid-swap (where the swap is not one atomic exchange)
        remove_leftovers(out_dir.parent, out_dir.name)
        check_output_folder(out_dir, sources)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            replace_dir(tmp / "out", out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["seconds"] = round(time.time() - t0, 2)
    meta["out_dir"] = str(out_dir)
    return meta


def check_output_folder(out_dir: Path, sources: list[str]) -> None:
    """Refuse an output that would destroy data gptlab did not make: a file, a folder of other things, an input."""
    out = out_dir.resolve()
    for src in sources:
        if src in CORPORA or src.startswith(("http://", "https://")):
            continue
        s = Path(src).resolve()
        if s == out or out in s.parents or s in out.parents:
            raise GptlabError(
                f"--out {out_dir} overlaps the source {src}; choose an output folder outside the "
                f"inputs (nothing was written)"
            )
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise GptlabError(f"--out {out_dir} exists and is not a folder; choose a new folder name (nothing was written)")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        own = dataset_files(out_dir)
        if own is None:
            raise GptlabError(
                f"--out {out_dir} is a folder that is not a gptlab dataset (no gptlab meta.json); "
                f"prepare only replaces its own datasets: choose a new or empty folder (nothing was "
                f"written)"
            )
        others = [e for e in entries(out_dir) if e not in own]
        if others:
            shown = some(others)
            raise GptlabError(
                f"--out {out_dir} holds a gptlab dataset and other things ({shown}); prepare replaces only a "
                f"dataset's own files: move those away or choose another folder (nothing was written)"
            )


def _build(
    sources: list[str],
    tmp: Path,
    tokenizer: str,
    vocab_size: int | None,
    val_fraction: float,
    field: str,
    shard_tokens: int,
    batch_bytes: int,
    progress: bool,
    tokenizer_from: str | None = None,
) -> dict[str, Any]:
    """Tokenize into ``tmp/out`` (using ``tmp`` for downloads and the token stream); returns the metadata."""
    downloads = tmp / "downloads"
    downloads.mkdir()
    docs = lambda: iter_documents(sources, field, downloads)
    tok = make_tokenizer(tokenizer, (text for _, text in docs()), vocab_size, tokenizer_from)
    dtype = token_dtype(tok.vocab_size)
    stream = tmp / "all.tokens"

    def batches() -> Iterator[tuple[list[str], int]]:  # ~batch_bytes of documents at a time
        batch, size = [], 0
        for _, text in docs():
            if text:
                batch.append(text)
                size += len(text)
            if size >= batch_bytes:
                yield batch, size
                batch, size = [], 0
        if batch:
            yield batch, size

    eot = np.array([tok.eot_id], dtype=dtype).tobytes()
    n_docs = n_tokens = n_chars = 0
    with (
        open(stream, "wb") as out,
        tqdm(
            desc="tokenizing",
            unit="char",
            unit_scale=True,
            disable=None if progress else True,  # None: only on a terminal
            leave=False,
        ) as bar,
    ):
        for batch, size in batches():
            for ids in tok.encode_batch(batch):
                if n_docs:  # end-of-text between documents
                    out.write(eot)
                    n_tokens += 1
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
                n_docs += 1
            n_chars += size
            bar.update(size)
    if n_tokens < 2:
        raise GptlabError(f"no text found in {sources}; the sources are empty")
    all_tokens = np.memmap(stream, dtype=dtype, mode="r")
    n_val = max(1, round(n_tokens * val_fraction))
    n_val = min(n_val, n_tokens - 1)
    build = tmp / "out"
    build.mkdir()
    splits = {"train": all_tokens[: n_tokens - n_val], "val": all_tokens[n_tokens - n_val :]}
    files: dict[str, list[str]] = {}
    for split, toks in splits.items():
        files[split] = []
        for i, start in enumerate(range(0, max(len(toks), 1), shard_tokens)):
            name = f"{split}_{i:03d}.bin"
            write_shard(build / name, np.asarray(toks[start : start + shard_tokens]))
            files[split].append(name)
    meta = {
        "format": "gptlab-tokens",
        "version": 1,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "documents": n_docs,
        "text_chars": n_chars,
        "tokens": {"train": int(n_tokens - n_val), "val": int(n_val)},
        "files": files,
        "val_fraction": val_fraction,
        "sources": sources,
        "field": field,
    }
    atomic_write_text(build / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    del all_tokens
    return meta
