"""The modern block (rotary positions, RMSNorm, SwiGLU / ReLU², grouped-query attention, QK-norm, soft-capping, Muon)
against references no one here wrote: random-initialised ``transformers`` Llama, Qwen2 and Qwen3 models in several
shapes, hand computations and a float64 SVD."""

import asyncio
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import PRESETS, GPTConfig, preset
from gptlab.errors import GptlabError
from gptlab.generate import Engine, Sampling
from gptlab.generate.speculative import ModelDraft, NgramDraft
from gptlab.kv_cache import KVCache
from gptlab.layers import LinearCrossEntropy, apply_rotary, rope_cos_sin
from gptlab.model import GPT
from gptlab.plan import kv_cache_bytes, params, resolve
from gptlab.quant.quantize import quantize_model

transformers = pytest.importorskip("transformers")
GREEDY = Sampling(temperature=0)

SHAPES = {  # family, HF config fields
    "llama-gqa-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    "llama-odd-head-dim": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    "llama-biases": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3-rope-scaling": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2-qkv-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def hf_model(name: str, vocab: int = 120):
    family, fields = SHAPES[name]
    config_cls, model_cls = CLASSES[family]
    base = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=vocab, max_position_embeddings=96)
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**base, "tie_word_embeddings": False, **fields})).eval()
    with torch.no_grad():  # HF's init is tiny; perturb every weight so norms, biases and gains matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def ours_from(hf) -> GPT:
    from gptlab.interop.hf import config_from_hf, from_hf_state_dict

    cfg = config_from_hf(hf.config.to_dict())
    model = GPT(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    hf = hf_model(request.param)
    return hf, ours_from(hf)


def test_logits_equal_transformers(pair):
    hf, ours = pair
    idx = torch.randint(0, 120, (3, 50))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_tokens_equal_transformers_generate_and_the_cache_equals_the_full_forward(pair):
    hf, ours = pair
    prompt = torch.randint(0, 120, (1, 9))
    with torch.no_grad():
        ones = torch.ones_like(prompt)  # explicit: generate would take token 0 in the prompt for padding
        want = hf.generate(
            prompt, attention_mask=ones, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, 9:]
    got = Engine(ours).generate_tokens([prompt[0].tolist()], 24, GREEDY)[0].tokens
    # equal, or equal up to a near-tie: each of our tokens is transformers' argmax of our sequence (within 1e-4)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt[0].tolist() + got])).logits[0, 8:-1]
    chosen = logits.gather(1, torch.tensor(got)[:, None])[:, 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()
    first = next((i for i, (a, b) in enumerate(zip(got, want.tolist())) if a != b), len(got))
    assert first == len(got) or (logits[first].topk(2).values.diff().abs() < 1e-4).item()
    # the KV cache (only the key/value heads) equals recomputing everything, at every step
    cfg = ours.config
    seq = torch.randint(0, 120, (2, 30))
    cache = KVCache(cfg, 2, 30)
    assert cache.nbytes == kv_cache_bytes(resolve(cfg), 30, 2, "fp32")
    with torch.no_grad():
        ours.decode(seq[:, :10], cache, torch.arange(10))
        for t in range(10, 30):
            step = ours.decode(seq[:, t : t + 1], cache, torch.tensor([t]))[:, -1]
            torch.testing.assert_close(step, ours(seq[:, : t + 1])[0][:, -1], atol=1e-5, rtol=1e-5)


def test_batched_equals_alone_and_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [40, 41, 42]]
    engine = Engine(ours)
    for sampling in (GREEDY, Sampling(temperature=0.9, top_k=20, seed=3)):
        batch = [c.tokens for c in engine.generate_tokens(prompts, 16, sampling)]
        alone = [
            engine.generate_tokens([p], 16, Sampling(**{**sampling.to_dict(), "seed": sampling.seed + i}))[0].tokens
            for i, p in enumerate(prompts)
        ]
        assert batch == alone


def test_hf_to_gptlab_to_hf_round_trip_is_exact(pair, tmp_path):
    from gptlab.interop.hf import save_hf

    hf, ours = pair
    out = save_hf(ours.state_dict(), ours.config, {"kind": "char", "chars": "abcdefghij"}, tmp_path / "hf")
    back = type(hf).from_pretrained(out).eval()
    theirs, again = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(again)
    assert all(torch.equal(theirs[k], again[k]) for k in theirs)
    assert json.loads((out / "config.json").read_text())["model_type"] == hf.config.model_type


def test_the_scheduler_speculative_decoding_and_int8_on_a_modern_model():
    from gptlab.serve.scheduler import Request, Scheduler
    from gptlab.tokenizer import CharTokenizer

    from .test_scheduler import collect, run

    ours = ours_from(hf_model("llama-gqa-tied", vocab=27))
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    prompts = [tok.encode(t) for t in ("abcabcabc", "hello", "zz")]
    plain = [c.tokens for c in Engine(ours).generate_tokens(prompts, 20, GREEDY)]
    for draft in (NgramDraft(), ModelDraft(ours_from(hf_model("llama-mqa-untied", vocab=27)))):
        spec = Engine(ours, draft=draft, spec_min_speedup=0.0).generate_tokens(prompts, 20, GREEDY)
        assert [c.tokens for c in spec] == plain
    sched = Scheduler(ours, tok, max_batch=2)

    async def main():
        return await asyncio.gather(
            *[collect(sched, Request(p, 20, GREEDY, seed=0, stop_ids=frozenset())) for p in prompts]
        )

    try:
        got = run(main())
    finally:
        sched.close()
    assert [g[0] for g in got] == plain  # 3 requests on 2 rows: a row is reused
    q = quantize_model(ours_from(hf_model("llama-gqa-tied", vocab=27)), "int8")
    idx = torch.tensor([prompts[0] * 3])
    with torch.no_grad():
        ref, got8 = ours(idx)[0], q(idx)[0]
    assert ((got8 - ref).norm() / ref.norm()).item() < 0.02


def test_parameter_counts_equal_transformers_for_the_presets():
    from gptlab.interop.hf import config_to_hf

    for name in ("smollm2-135m", "smollm2-360m", "llama-3.2-1b", "qwen2.5-0.5b"):
        cfg = preset(name)
        hc = config_to_hf(cfg, 0, 1)
        config_cls, model_cls = CLASSES[hc["model_type"]]
        with torch.device("meta"):
            hf = model_cls(config_cls(**{k: v for k, v in hc.items() if k not in ("architectures", "model_type")}))
            ours = GPT(cfg)
        assert ours.num_params() == sum(p.numel() for p in hf.parameters()), name
    assert preset("smollm2-135m").n_kv_heads == 3 and GPT(preset("smollm2-135m", n_layer=1)).num_params() > 0
    for name in PRESETS:  # the planner counts what the model holds, modern options included
        with torch.device("meta"):
            model = GPT(preset(name))
        assert model.num_params(breakdown=True) == params(resolve(preset(name))), name


def test_rotary_positions_by_hand():
    """RoFormer's rotation: channel pairs (i, i + d/2) as complex numbers times e^(i·m·θ_i), θ_i = base^(-2i/d);
    the score of a rotated query and key depends only on their distance."""
    cfg = GPTConfig(n_embd=32, n_head=2, positions="rope", rope_theta=100.0)
    d = cfg.head_dim
    x = torch.randn(1, 1, 5, d, dtype=torch.float64)
    pos = torch.arange(5)
    cos, sin = rope_cos_sin(cfg, pos, torch.float64)
    got = apply_rotary(x, cos, sin)
    theta = 100.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.exp(1j * pos[:, None].double() * theta)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1))
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64)
    score = lambda m, n: (apply_rotary(q, *rope_cos_sin(cfg, torch.tensor([m]), torch.float64)) *
                          apply_rotary(k, *rope_cos_sin(cfg, torch.tensor([n]), torch.float64))).sum()  # fmt: skip
    assert score(7, 3).item() == pytest.approx(score(27, 23).item(), rel=1e-6)  # angles in float32, as HF
    assert score(7, 3).item() != pytest.approx(score(7, 4).item(), rel=1e-3)


def test_rmsnorm_swiglu_relu2_and_softcap_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    for mlp in ("swiglu", "relu2"):
        cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=20, positions="rope",
                        norm_type="rmsnorm", mlp=mlp, mlp_hidden=24, bias=False, logit_softcap=3.0)  # fmt: skip
        model = GPT(cfg)
        block = model.h[0]
        g = torch.randn(16)
        with torch.no_grad():
            block.ln_1.weight.copy_(g)
        want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps) * g
        torch.testing.assert_close(block.ln_1(x), want)
        W1, W2 = block.mlp.c_fc.weight, block.mlp.c_proj.weight
        if mlp == "swiglu":
            gate, up = W1[:24], W1[24:]
            want = (F.silu(x @ gate.T) * (x @ up.T)) @ W2.T
        else:
            want = torch.clamp(x @ W1.T, min=0) ** 2 @ W2.T
        torch.testing.assert_close(block.mlp(x), want)
        idx = torch.randint(0, 20, (2, 8))
        logits = model(idx)[0]
        raw = model.lm_head(model.hidden_states(idx))
        torch.testing.assert_close(logits, 3.0 * torch.tanh(raw / 3.0))
        assert logits.abs().max() < 3.0
    # parameter-free RMSNorm (nanochat): no weights at all
    assert sum(p.numel() for p in GPT(preset("baby-modern", vocab_size=20)).h[0].ln_1.parameters()) == 0


def test_the_fused_loss_with_softcap_equals_autograd_on_the_capped_logits():
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 20, (37,))
    t[::5] = -1
    loss = LinearCrossEntropy.apply(x, w, t, 20, 8, 2.5)
    gx, gw = torch.autograd.grad(loss, (x, w))
    logits = 2.5 * torch.tanh(F.linear(x, w) / 2.5)
    ref = F.cross_entropy(logits[:, :20], t, ignore_index=-1)
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_muons_update_is_the_orthogonalised_gradient():
    """One Muon step from zero momentum, against a float64 SVD of the gradient G = U S Vᵀ: the update is
    U f(S) Vᵀ (it keeps G's singular vectors: diagonal in those bases, up to the bfloat16 that Newton-Schulz runs
    in) with every kept singular value pushed towards one (the quintic lands them in about [0.6, 1.2]; Jordan et al.
    2024), where G's own span orders of magnitude."""
    from gptlab.train.optim import OptimConfig, make_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=8, vocab_size=20))
    opt = make_optimizer(model, OptimConfig(optimizer="muon", lr=0.1, weight_decay=0.0, muon_momentum=0.0), "cpu")
    w = model.h[0].mlp.c_fc.weight  # [128, 32]
    before = w.detach().clone()
    model(torch.randint(0, 20, (16, 8)), torch.randint(0, 20, (16, 8)))[1].backward()
    g = w.grad.detach().double()
    opt.step()
    update = (before - w.detach()).double()
    u, s, vt = torch.linalg.svd(g, full_matrices=False)
    proj = u.T @ update @ vt.T  # the update in the gradient's singular bases
    diag = torch.diagonal(proj)
    assert (proj - torch.diag(diag)).norm() < 0.05 * proj.norm()
    kept = s > 1e-3 * s.max()  # directions the gradient has (it may be rank-deficient)
    f = diag[kept] / diag[kept].max()
    assert f.min() > 0.5 and (s[kept] / s.max()).min() < 0.5 * f.min()
    # embeddings and the head stay with AdamW; Muon gets only matrices
    assert all(p.dim() == 2 for p in opt.muon.param_groups[0]["params"])
    assert model.wte.weight in {p for grp in opt.adamw.param_groups for p in grp["params"]}


def test_options_that_cannot_combine_are_one_clear_error():
    with pytest.raises(GptlabError, match="routed experts are GELU MLPs"):
        GPTConfig(mlp="swiglu", n_experts=4, experts_per_token=2)
    with pytest.raises(GptlabError, match="not a multiple of n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)
    with pytest.raises(GptlabError, match="rope_scaling needs positions = rope"):
        GPTConfig(rope_scaling="llama3")
    from gptlab.interop.hf import config_to_hf

    with pytest.raises(GptlabError, match="cannot hold .*soft-capping"):
        config_to_hf(preset("baby-modern"), 0)
    with pytest.raises(GptlabError, match="GPT-2 layout cannot hold"):
        config_to_hf(preset("baby", norm_type="rmsnorm"), 0)


def test_the_model_chat_template_renders_as_transformers_does(tmp_path):
    """A model's tokenizer.json with its special tokens and its chat template (tokenizer_config.json): token ids
    equal transformers' tokenizer, the prompt equals apply_chat_template's, and the folder loads through the one
    loader with the template the server uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptlab.chat import ChatTemplate
    from gptlab.interop.hf import save_hf
    from gptlab.loader import load_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the user asks and the assistant answers politely, " * 20, "system prompts set the tone. " * 20]
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    template = (  # SmolLM2-Instruct's ChatML template, with a loop control and an error, as real templates have
        "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role') }}{% endif %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    folder = tmp_path / "model"
    hf = hf_model("llama-gqa-tied", vocab=tok.get_vocab_size())
    hf.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "bos_token": "<|im_start|>",
                "chat_template": template,
            }
        )
    )
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = load_model(folder, "cpu")
    ours = loaded.tokenizer
    for t in ["the user asks", "Hello there! 1234 — naïve", "<|im_start|>user\nhi<|im_end|>", ""]:
        assert ours.encode(t) == theirs.encode(t, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]  # fmt: skip
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.of(ours).render(messages) == want
    assert ours.eot_id == theirs.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(GptlabError, match="unknown role"):
        ChatTemplate.of(ours).render([{"role": "tool", "content": "x"}])
    with torch.no_grad():
        idx = torch.tensor([ours.encode("the user asks")])
        assert (hf(idx).logits - loaded.model(idx)[0]).abs().max() <= 1e-4
    # and back out: transformers reads gptlab's export with the same special tokens and template
    out = save_hf(loaded.model.state_dict(), loaded.config, loaded.meta["tokenizer"], tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert again.eos_token == "<|im_end|>"


def test_rope_and_llama3_scaling_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gptlab.layers import rope_frequencies

    hf = hf_model("llama3-rope-scaling")
    cfg = ours_from(hf).config
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), theirs)
    assert not math.isclose(rope_frequencies(cfg)[-1].item(), rope_frequencies(cfg.replace(rope_scaling="none"))[-1])


def test_packing_and_an_image_prefix_work_with_the_modern_block():
    """Packed documents restart their rotary positions, so a packed example's logits equal the example alone; an
    image prefix takes rotary positions like text, and a batch decodes as its rows alone."""
    torch.manual_seed(0)
    model = GPT(preset("baby-modern", vocab_size=40, n_kv_head=2)).eval()
    a, b = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 9))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids)[0]
        torch.testing.assert_close(together[:, :7], model(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 7:], model(b)[0], atol=1e-5, rtol=1e-5)
    vision = GPT(preset("baby-modern", vocab_size=40, image_size=8, patch_size=4, image_channels=1)).eval()
    images = torch.rand(2, 1, 8, 8)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    engine = Engine(vision)
    batch = [c.tokens for c in engine.generate_tokens(prompts, 8, GREEDY, images=images)]
    alone = [engine.generate_tokens([p], 8, GREEDY, images=images[i : i + 1])[0].tokens for i, p in enumerate(prompts)]
    assert batch == alone


def test_gguf_export_of_the_llama_architecture_reads_back_exactly_and_llama_cpp_runs_it(tmp_path):
    """`gptlab convert` to GGUF writes llama.cpp's llama layout (q/k rows interleaved for its rotary pairing, the
    byte-level BPE with its pre-tokenizer): gptlab's GGUF reader gets the same logits back, and llama.cpp, where
    installed, computes them from the f32 file to within 1e-3 and tokenizes as gptlab does."""
    import numpy as np

    from gptlab.interop.gguf import save_gguf
    from gptlab.interop.gguf_read import load_gguf
    from gptlab.loader import build
    from gptlab.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["hello world the quick brown fox " * 50, "numbers 123 and 456 " * 30], 300)
    ours = ours_from(hf_model("llama-gqa-tied", vocab=tok.vocab_size))
    path = save_gguf(ours.state_dict(), ours.config, tok.spec(), tmp_path / "m.gguf", "f32")
    sd, cfg, spec, _ = load_gguf(path)
    idx = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(build(sd, cfg)(idx)[0], want, atol=0, rtol=0)
    assert spec is not None and spec["kind"] == "bpe"
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from gptlab.interop.llama_peer import open_llama

    llm = open_llama(str(path), logits_all=True, n_ctx=64)
    llm.eval(idx[0].tolist())
    assert np.abs(np.array(llm.scores[:20]) - want[0].numpy()).max() < 1e-3
    assert llm.tokenize(b"hello world 123", add_bos=False) == tok.encode("hello world 123")


def test_gguf_quantized_types_read_back_close_and_other_architectures_are_one_error(tmp_path):
    """Q8_0 and Q4_0 files (quantized by the gguf package, read back through it) give logits close to the float
    model's; a GGUF file of another architecture is refused, naming it."""
    from gptlab.interop.gguf import save_gguf
    from gptlab.interop.gguf_read import load_gguf
    from gptlab.loader import build, load_model
    from gptlab.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["hello world the quick brown fox " * 50, "numbers 123 and 456 " * 30], 300)
    ours = ours_from(hf_model("llama-gqa-tied", vocab=tok.vocab_size))
    idx = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        want = ours(idx)[0]
        for kind, tol in (("f16", 0.002), ("q8_0", 0.02), ("q4_0", 0.25)):
            path = save_gguf(ours.state_dict(), ours.config, tok.spec(), tmp_path / f"m-{kind}.gguf", kind)
            got = build(*load_gguf(path)[:2])(idx)[0]
            assert ((got - want).norm() / want.norm()).item() < tol, kind
    gpt2 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257))
    path = save_gguf(gpt2.state_dict(), gpt2.config, {"kind": "gpt2"}, tmp_path / "gpt2.gguf")
    with pytest.raises(GptlabError, match="architecture is 'gpt2'; gptlab reads llama"):
        load_model(path, "cpu")
