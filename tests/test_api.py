"""The notebook API, ``gptlab.load(...)``, checked against Hugging Face transformers and tiktoken on a
random-weight GPT-2-shaped model: generation equals HF's greedy ``generate``, log-likelihoods and perplexity equal
HF's log-softmax, ``save`` round-trips through ``from_pretrained``; plus the invariants (batched = alone, streamed =
whole)."""

import importlib
import math

import pytest
import torch

import gptlab
from gptlab.checkpoint import save_model_checkpoint

from .conftest import gpt2_shaped

transformers = pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def lm_and_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model = gpt2_shaped()
    save_model_checkpoint(root / "checkpoint_dir", model.state_dict(), model.config, {"kind": "gpt2"})
    lm = gptlab.load(str(root / "checkpoint_dir"), device="cpu")
    lm.save(root / "hf", format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "hf").eval()
    return lm, hf, root


def hf_logprob(hf, ids, n_cont):
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))


def test_entry_points_are_exported():
    for name in (
        "load",
        "LM",
        "load_model",
        "train",
        "prepare",
        "Engine",
        "Sampling",
        "TrainConfig",
        "AlignConfig",
        "GPTConfig",
        "GPT",
        "preset",
    ):
        assert hasattr(gptlab, name), name
    importlib.import_module("gptlab.train.trainer")  # a submodule is an attribute once imported, as in any package
    assert callable(gptlab.train) and gptlab.train.trainer.train  # the package is callable and still a package


def test_greedy_generate_equals_transformers(lm_and_hf):
    lm, hf, _ = lm_and_hf
    enc = tiktoken.get_encoding("r50k_base")
    prompt = "The meaning of life is"
    text = lm.generate(prompt, max_new_tokens=20, temperature=0)
    ids = enc.encode(prompt)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=50256)[0, len(ids) :]
    ref = ref.tolist()
    if 50256 in ref:  # HF stops at end-of-text and includes it; gptlab stops before it
        ref = ref[: ref.index(50256)]
    assert text == enc.decode(ref)


def test_batched_streamed_and_alone_agree(lm_and_hf):
    lm, _, _ = lm_and_hf
    prompts = ["Hello", "A much longer prompt about the weather in spring and", "x"]
    together = lm.generate(prompts, max_new_tokens=12, temperature=0.9, top_k=50, seed=7)
    alone = [lm.generate(p, max_new_tokens=12, temperature=0.9, top_k=50, seed=7 + i) for i, p in enumerate(prompts)]
    assert together == alone
    assert (
        "".join(lm.generate(prompts[1], max_new_tokens=12, temperature=0.9, top_k=50, seed=8, stream=True))
        == together[1]
    )
    # no max_new_tokens: to the end of the context
    full = lm.generate("Hi", temperature=0)
    assert len(lm.tokenizer.encode("Hi")) + len(lm.tokenizer.encode(full)) <= lm.config.block_size


def test_loglikelihood_and_perplexity_equal_transformers(lm_and_hf):
    lm, hf, _ = lm_and_hf
    tok = lm.tokenizer
    ctx, cont = "The capital of France is", " Paris, of course"
    ids = tok.encode(ctx) + tok.encode(cont)
    assert lm.loglikelihood(ctx, cont) == pytest.approx(hf_logprob(hf, ids, len(tok.encode(cont))), abs=1e-4)
    pairs = [(ctx, cont), ("", "Hello")]
    both = lm.loglikelihood(pairs)
    assert both[1] == pytest.approx(
        hf_logprob(hf, [tok.eot_id] + tok.encode("Hello"), len(tok.encode("Hello"))), abs=1e-4
    )
    text = "A short text to score, scored in one window."
    ids = [tok.eot_id] + tok.encode(text)
    assert lm.perplexity(text) == pytest.approx(math.exp(-hf_logprob(hf, ids, len(ids) - 1) / (len(ids) - 1)), rel=1e-4)


def test_save_both_formats_round_trip(lm_and_hf, tmp_path):
    lm, hf, _ = lm_and_hf
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    again = gptlab.load(str(lm.save(tmp_path / "ours")), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again.model(idx)[0], lm.model(idx)[0])
    with pytest.raises(gptlab.GptlabError, match="format must be"):
        lm.save(tmp_path / "x", format="onnx")
    assert "parameters" in repr(lm)


def test_the_readme_notebook_example_runs(tmp_path):
    import subprocess
    import sys

    from .conftest import ENV, REPO

    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "notebook_api.py"), "--out", str(tmp_path), "--steps", "20"],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "greedy:" in r.stdout and "nats" in r.stdout and (tmp_path / "exported-hf" / "config.json").is_file()
    again = gptlab.load(str(tmp_path / "exported-hf"), device="cpu")  # the HF export loads back through the loader
    assert again.config.n_layer == 2
