"""Hugging Face / OpenAI interop, verified with transformers itself: exported folders load with
``from_pretrained`` / ``AutoTokenizer`` and give the same logits, greedy text and token ids; imported ones too."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gptlab.checkpoint import load_checkpoint
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.generate import Engine, Sampling
from gptlab.interop.hf import save_hf, to_hf_state_dict
from gptlab.interop.openai import from_openai_variables
from gptlab.loader import load_model
from gptlab.model import GPT
from gptlab.tokenizer import BPETokenizer, GPT2Tokenizer

from .conftest import gpt2_shaped, hf_pair, run_cli

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! It's 2026, isn't it?",
    "  leading spaces\nand\ttabs",
    "naïve café 日本語 🙂",
    "<|endoftext|> is text here",
    "1234567 numbers, and 'quotes'",
]


def copy_gpt2_tokenizer_files(dest):
    """GPT-2's tokenizer files, as our exporter writes them (checked against tiktoken and transformers above)."""
    model = gpt2_shaped()
    tmp = dest.parent / "tokfiles"
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (dest / f).write_bytes((tmp / f).read_bytes())


def logits_equal(ours, hf, idx):
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"pad_vocab_multiple": 64}, {"tie_weights": False, "bias": False}])
def test_export_loads_in_transformers_with_same_logits_greedy_text_and_tokens(tmp_path, kw):
    model = gpt2_shaped(**kw)
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 40))
    logits_equal(model, hf, idx)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = GPT2Tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)  # <|endoftext|> read as the end-of-text id by both
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    prompt = tok.encode("The meaning of life is")
    ref = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        pad_token_id=tok.eot_id,
    )
    ours = Engine(model, tok).generate_tokens([prompt], 40, Sampling(temperature=0), stop_ids=[])[0].tokens
    assert ours == ref[0, len(prompt) :].tolist()
    assert hf_tok.decode(ours) == tok.decode(ours)


def test_gpt2_vocab_and_merges_files_are_gpt2s(tmp_path):
    model = gpt2_shaped()
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp_path / "hf")
    merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 50001 and merges[1:4] == ["Ġ t", "Ġ a", "h e"]
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    slow = transformers.GPT2Tokenizer(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt"))
    for text in TEXTS[:3]:
        assert slow.encode(text) == GPT2Tokenizer().encode(text)


def test_import_transformers_folder_and_convert_both_ways(tmp_path):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257)
    hf, _ = hf_pair(cfg)
    hf.save_pretrained(tmp_path / "hf")
    copy_gpt2_tokenizer_files(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    model, meta = loaded.model, loaded.meta
    assert meta["tokenizer"] == {"kind": "gpt2"}
    idx = torch.randint(0, 50257, (2, 30))
    logits_equal(model, hf, idx)
    r = run_cli("convert", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "ours"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["to"] == "gptlab"
    ours, _ = load_checkpoint(tmp_path / "ours")
    logits_equal(ours, hf, idx)
    r = run_cli("convert", str(tmp_path / "ours"), "--out-dir", str(tmp_path / "back"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["to"] == "hf", r.stderr
    logits_equal(ours, transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval(), idx)
    r = run_cli("convert", str(tmp_path / "ours"), "--out-dir", str(tmp_path / "back"))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_gpt1_round_trip_through_openai_gpt_lm_head_model(tmp_path):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=300, norm="post")
    hf, ours = hf_pair(cfg)
    hf.save_pretrained(tmp_path / "gpt1")
    tok = BPETokenizer.train(["a few words of training text for a tiny tokenizer"] * 20, vocab_size=300)
    tok.tok.save(str(tmp_path / "gpt1" / "tokenizer.json"))
    loaded = load_model(tmp_path / "gpt1")
    model, meta = loaded.model, loaded.meta
    idx = torch.randint(0, 300, (2, 30))
    logits_equal(model, hf, idx)
    save_hf(model.state_dict(), model.config, meta["tokenizer"], tmp_path / "back")
    back = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "back").eval()
    logits_equal(ours, back, idx)


def test_hub_layout_with_bare_names_and_mask_buffers(tmp_path):
    """The Hub's original gpt2/distilgpt2 files: GPT2Model names (h.0..., wte.weight) and attn.bias buffers."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257)
    hf, _ = hf_pair(cfg)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "d").mkdir()
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    hf.config.to_json_file(tmp_path / "d" / "config.json")
    copy_gpt2_tokenizer_files(tmp_path / "d")
    model = load_model(tmp_path / "d").model
    logits_equal(model, hf, torch.randint(0, 50257, (1, 20)))


def test_truncated_or_mismatched_weights_are_clear_errors(tmp_path):
    model = gpt2_shaped()
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GptlabError, match=r"truncated: tensor '[\w.]+' needs bytes"):
        load_model(tmp_path / "hf")
    f.write_bytes(data)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, "n_embd": 32, "n_head": 2}))
    with pytest.raises(GptlabError, match=r"tensor '[\w.]+' has shape"):
        load_model(tmp_path / "hf")


def test_openai_release_layout(tmp_path):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257)
    hf, _ = hf_pair(cfg)
    # openai/gpt-2 model.py names: model/h<i>/<sub>/{g,b,w}; conv weights [1, in, out]; no lm_head (tied)
    variables = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" or (k.endswith(".attn.bias") and v.dim() > 1):
            continue
        name = k.removeprefix("transformer.").replace(".weight", "/w").replace(".bias", "/b")
        name = "model/" + name.replace("h.", "h", 1).replace(".", "/")
        if "ln_" in name:
            name = name.replace("/w", "/g")
        if name.endswith(("wte/w", "wpe/w")):
            name = name[:-2]
        arr = v.numpy()
        variables[name] = arr[None] if name.endswith("/w") else arr
    assert variables["model/h0/attn/c_attn/w"].shape == (1, 64, 192)
    model = GPT(cfg).eval()
    model.load_state_dict(from_openai_variables(variables, cfg))
    logits_equal(model, hf, torch.randint(0, 50257, (1, 20)))
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "hparams.json").write_text(
        json.dumps({"n_vocab": 50257, "n_ctx": 64, "n_embd": 64, "n_head": 2, "n_layer": 2})
    )
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(GptlabError, match="pip install tensorflow-cpu"):
            load_model(tmp_path / "rel")


@pytest.mark.slow
def test_sample_cli_on_a_hugging_face_folder_stream_and_interactive(tmp_path):
    model = gpt2_shaped()
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp_path / "hf")
    r = run_cli(
        "sample",
        str(tmp_path / "hf"),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--num-samples",
        "3",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["samples"]) == 3 and len(set(out["samples"])) == 1  # greedy: identical rows
    tok = GPT2Tokenizer()
    prompt = tok.encode("Hello")
    ref = Engine(model, tok).generate_tokens([prompt], 12, Sampling(temperature=0), stop_ids=[tok.eot_id])[0]
    assert out["samples"][0] == tok.decode(ref.tokens)
    assert out["kv_cache_bytes"] == 2 * 2 * 3 * 2 * 32 * (len(prompt) + 12) * 4
    r = run_cli(
        "sample", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0", "--stream"
    )
    assert r.returncode == 0 and r.stdout.rstrip("\n") == "Hello" + out["samples"][0], r.stderr
    r = run_cli(
        "sample", str(tmp_path / "hf"), "--interactive", "--max-new-tokens", "5", stdin="Hello\n/reset\nagain\n/quit\n"
    )
    assert r.returncode == 0 and r.stdout.count("> ") >= 3, r.stderr


def test_hub_name_offline_is_a_clear_error():
    r = run_cli("sample", "openai-community/gpt2-does-not-exist", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert r.stderr.startswith("gptlab: error: ") and "pass a local folder" in r.stderr and r.stderr.count("\n") == 1


def test_to_hf_state_dict_has_no_shared_tensors():
    model = gpt2_shaped()
    sd = to_hf_state_dict(model.state_dict(), model.config)
    assert "lm_head.weight" not in sd and sd["transformer.wte.weight"].shape == (50257, 64)
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], model.h[0].attn.c_attn.weight.t())


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_literal_end_of_text_means_the_same_to_gptlab_and_to_its_exported_tokenizer(tmp_path, kind):
    """gptlab reads the text <|endoftext|> as the end-of-text id; so does transformers with the files gptlab
    exports, for every tokenizer kind."""
    from gptlab.tokenizer import CharTokenizer

    text = "first document.<|endoftext|>second, and <|endoftext|> once more"
    tok = {
        "gpt2": GPT2Tokenizer,
        "char": lambda: CharTokenizer.train([text.replace("<|endoftext|>", "")]),
        "bpe": lambda: BPETokenizer.train([text.replace("<|endoftext|>", "")] * 20, vocab_size=300),
    }[kind]()
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=64, vocab_size=tok.vocab_size)
    save_hf(GPT(cfg).state_dict(), cfg, tok.spec(), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.encode(text)
    assert ids.count(tok.eot_id) == 2
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
