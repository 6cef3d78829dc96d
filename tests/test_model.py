"""The model against Hugging Face transformers' own GPT-2 and GPT-1 implementations (independent references)."""

import random

import pytest
import torch

from gptlab.config import PRESETS, GPTConfig, preset
from gptlab.errors import GptlabError
from gptlab.model import GPT

from .conftest import hf_pair

transformers = pytest.importorskip("transformers")


def random_configs(norm):
    rng = random.Random(1234 if norm == "pre" else 4321)
    for i in range(3):
        n_head = rng.choice([1, 2, 4])
        yield GPTConfig(
            n_layer=rng.randint(1, 3),
            n_head=n_head,
            n_embd=n_head * rng.choice([8, 16]),
            block_size=rng.choice([16, 32]),
            vocab_size=rng.randint(50, 300),
            norm=norm,
            activation="gelu" if norm == "pre" and i == 1 else "gelu_new",
            pad_vocab_multiple=rng.choice([1, 64]),
            tie_weights=rng.random() < 0.7 or norm == "post",
        )


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_logits_and_loss_match_transformers(norm):
    for cfg in random_configs(norm):
        hf, ours = hf_pair(cfg)
        idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
        with torch.no_grad():
            ref = hf(idx, labels=idx)
            _, loss = ours(idx[:, :-1], idx[:, 1:])  # HF shifts labels inside; we pass targets
            full, _ = ours(idx)
        assert full.shape == ref.logits.shape
        torch.testing.assert_close(full, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_padded_vocab_never_enters_loss_or_gradient():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=70, pad_vocab_multiple=64)
    model = GPT(cfg)
    assert model.wte.weight.shape[0] == 128
    idx = torch.randint(0, 70, (2, 8))
    _, loss = model(idx, idx)
    assert model(idx)[0].shape[-1] == 70
    # reference: the same weights without padding rows
    plain = GPT(cfg.replace(pad_vocab_multiple=1))
    sd = {k: (v[:70] if k in ("wte.weight", "lm_head.weight") else v) for k, v in model.state_dict().items()}
    plain.load_state_dict(sd)
    _, ref = plain(idx, idx)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.wte.weight.grad[70:].abs().max() == 0


def test_gpt2_param_counts_equal_hf():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(
                transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
            )
            ours = GPT(cfg)
        assert ours.num_params() == hf.num_parameters(), name
    # the well-known published totals (HF model cards): 124,439,808 / 354,823,168 / 774,030,080 / 1,557,611,200
    with torch.device("meta"):
        assert GPT(preset("gpt2")).num_params() == 124_439_808
        assert GPT(preset("gpt2-xl")).num_params() == 1_557_611_200


def test_gpt1_param_count_equals_hf_and_breakdown_sums():
    with torch.device("meta"):
        hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig())
        ours = GPT(preset("gpt1"))
    assert ours.num_params() == hf.num_parameters()
    b = ours.num_params(breakdown=True)
    assert b["head"] == 0 and b["token_embedding"] == 40478 * 768 and b["position_embedding"] == 512 * 768
    assert (
        sum(b[k] for k in ("token_embedding", "position_embedding", "attention", "mlp", "norms", "head")) == b["total"]
    )


def test_gpt2_init_scales_residual_projections():
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=500)
    m = GPT(cfg)
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2*8) = 1/4
    assert m.h[0].attn.c_attn.bias.abs().max() == 0


@pytest.mark.parametrize(
    "bad",
    [dict(n_embd=100, n_head=3), dict(block_size=0), dict(norm="sandwich"), dict(activation="relu"), dict(dropout=1.5)],
)
def test_invalid_configs_raise_one_clear_error(bad):
    with pytest.raises(GptlabError) as e:
        GPTConfig(**bad)
    assert "\n" not in str(e.value) and "invalid model config" in str(e.value)


def test_too_long_input_is_a_clear_error():
    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    with pytest.raises(GptlabError, match="exceeds the model's context of 4"):
        m(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("vocab_slice", [7, 64, 4096])
def test_chunked_cross_entropy_equals_torch_cross_entropy(vocab_slice, monkeypatch):
    """Loss and both gradients of the fused head+loss equal F.cross_entropy on materialised logits, with ignored
    targets, several chunks, vocabulary padding, and the vocabulary made in one slice or several (a last partial)."""
    from gptlab import layers
    from gptlab.model import LinearCrossEntropy

    monkeypatch.setattr(layers, "VOCAB_SLICE", vocab_slice)

    torch.manual_seed(3)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)  # 50 real ids + 14 padding rows
    t = torch.randint(0, 50, (37,))
    t[[0, 9, 30]] = -1
    ref = torch.nn.functional.cross_entropy(x @ w[:50].t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(ref * 3.0, (x, w))
    for chunk in (1, 8, 37, 100):
        loss = LinearCrossEntropy.apply(x, w, t, 50, chunk)
        ox, ow = torch.autograd.grad(loss * 3.0, (x, w))
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(ox, gx)
        torch.testing.assert_close(ow, gw)
        assert ow[50:].abs().max() == 0


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_export_to_transformers_and_config_round_trip(norm):
    """gptlab weights exported with to_hf_state_dict load into HF's own class and give the same logits; the HF
    config maps back to the same gptlab config."""
    from gptlab.interop.hf import config_from_hf, to_hf_state_dict

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=90, norm=norm, pad_vocab_multiple=64)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if norm == "post":
        hf_cfg = transformers.OpenAIGPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=90)
        hf = transformers.OpenAIGPTLMHeadModel(hf_cfg)
    else:
        hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=90)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    # The tied head is stored once; transformers >= 5 lists it as missing, and it stays tied to the embedding.
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert not unexpected and all(
        k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight" for k in missing
    )
    idx = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-5)
    assert config_from_hf(hf_cfg.to_dict()) == cfg.replace(pad_vocab_multiple=1)


@pytest.mark.parametrize("preset_name", ["tiny", "baby-modern"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(preset_name):
    """Recomputing each block in backward (activation checkpointing) changes memory, not the math: loss and every
    gradient are bit-identical on the CPU."""
    torch.manual_seed(0)
    model = GPT(preset(preset_name).replace(vocab_size=97, block_size=32)).train()
    x = torch.randint(0, 97, (3, 32))
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        loss = model(x, x)[1]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_the_tied_embeddings_gradient_added_in_place_equals_transformers():
    """Training a tied model, the embedding's backward adds its rows into the fused loss's head gradient
    (``TiedEmbedding``): the embedding's gradient against HF's (its own lookup and head), ids repeated in a row."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=90, pad_vocab_multiple=64)
    hf, ours = hf_pair(cfg)
    assert ours._tied_gradient_in_place()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    idx[0, :4] = 5
    hf(idx, labels=idx).loss.backward()
    _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert loss.grad_fn is not None
    loss.backward()
    got, ref = ours.wte.weight.grad, hf.transformer.wte.weight.grad
    torch.testing.assert_close(got[: cfg.vocab_size], ref[: cfg.vocab_size], atol=1e-6, rtol=1e-5)
    assert got[cfg.vocab_size :].abs().max() == 0


@pytest.mark.parametrize("scale", [1.0, 0.5])  # the loss alone; scaled as by gradient accumulation
def test_the_tied_gradient_in_place_equals_pytorchs_embedding_backward(scale, monkeypatch):
    """Under bf16 autocast, with a scaled loss: every gradient as with PyTorch's embedding backward (a dense gradient
    that autograd adds to the head's), to float rounding."""
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    idx, tg = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    idx[1, :6] = 3
    grads = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(GPT, "_tied_gradient_in_place", lambda self: False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, tg)
        (loss * scale).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-7, rtol=1e-5, msg=name)
