"""LoRA and QLoRA against their definitions and against Hugging Face PEFT (LitGPT's merge tests as the model): the
base is untouched by an optimizer step, a merged weight is exactly W + (alpha / r) B A, merging twice changes
nothing, the merged model's logits equal the adapted model's, PEFT loads the saved adapter on gptlab's HF export and
gives the same logits, and an adapter on a quantized base trains while the codes stay put."""

import dataclasses
import json

import pytest
import torch

from gptlab import lora
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.interop import peft as peft_format
from gptlab.interop.hf import save_hf
from gptlab.model import GPT
from gptlab.quant.quantize import QuantLinear, quantize_model
from gptlab.train.optim import FINETUNE_OPTIM, make_optimizer

SHAPES = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50257),
    "llama-gqa": dict(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, vocab_size=50257, positions="rope",
        norm_type="rmsnorm", mlp="swiglu", mlp_hidden=96, bias=False, tie_weights=False,
    ),
}  # fmt: skip


def model_with_adapters(shape: str, targets: str = "all", rank: int = 4, alpha: float = 8.0) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape])).eval()
    lora.add_lora(model, targets, rank, alpha, 0.0)
    with torch.no_grad():  # B starts at zero; give it values so the update is visible
        for m in lora.adapters(model).values():
            for b in m.B.values():
                b.normal_(0, 0.05)
    return model


def tokens(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_merged_weight_is_w_plus_scaled_ba_and_logits_agree(shape):
    model = model_with_adapters(shape, "q,v,o,down" if shape == "gpt2" else "all")
    rows = lora.role_rows(model.config)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in lora.adapters(model)}
    by_hand = {n: w.clone() for n, w in before.items()}
    for name, m in lora.adapters(model).items():
        for role, (a, b) in m.slices.items():
            assert (a, b) == rows[role][1:]
            by_hand[name][a:b] += (8.0 / 4) * m.B[role].detach() @ m.A[role].detach()  # W + (alpha / r) B A
    x = tokens()
    adapted = model(x)[0]
    lora.merge(model)
    assert not lora.adapters(model) and not hasattr(model, "lora")
    for name, w in by_hand.items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x)[0], adapted, rtol=0, atol=1e-5)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    lora.merge(model)  # merging twice changes nothing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())


def test_an_optimizer_step_moves_only_the_adapters():
    model = model_with_adapters("llama-gqa", "q,k,v,gate").train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}
    assert all(p.requires_grad == (".lora." in n) for n, p in model.named_parameters())
    opt = make_optimizer(model, FINETUNE_OPTIM, "cpu")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(adapter)  # no optimizer state for the base
    x = tokens()
    model(x, x)[1].backward()
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)
    s = lora.trainable_summary(model)
    assert s["trainable_params"] == sum(p.numel() for p in adapter.values())


def test_targets_are_checked_and_a_gelu_mlp_has_no_gate():
    cfg = GPTConfig(**SHAPES["gpt2"])
    assert lora.parse_targets("all", cfg) == ["q", "k", "v", "o", "up", "down"]
    with pytest.raises(GptlabError, match="unknown role 'gate'"):
        lora.parse_targets("q,gate", cfg)
    with pytest.raises(GptlabError, match="already carries adapters"):
        lora.add_lora(model_with_adapters("gpt2"), "q", 2, 2.0, 0.0)


@pytest.mark.parametrize("shape,targets", [("gpt2", "q,v,o,up,down"), ("gpt2", "all"), ("llama-gqa", "all"),
                                           ("llama-gqa", "q,v")])  # fmt: skip
def test_peft_loads_the_saved_adapter_and_gives_the_same_logits(shape, targets, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = model_with_adapters(shape, targets)
    x = tokens()
    ours = model(x)[0]
    # the HF export of the base (adapters left out), then PEFT's adapter on top of it
    base_sd = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    save_hf(base_sd, model.config, {"kind": "gpt2"}, tmp_path / "base")
    peft_format.save_peft(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["fan_in_fan_out"] == (shape == "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and back: gptlab loads PEFT's folder onto a fresh base and gives the same logits
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(base_sd, strict=False)
    fresh.tie_()
    peft_format.load_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(fresh(x)[0], ours, rtol=0, atol=1e-5)


def test_an_adapter_for_another_base_is_one_clear_error(tmp_path):
    model = model_with_adapters("gpt2", "q,v")
    peft_format.save_peft(model, tmp_path / "adapter")
    other = GPT(GPTConfig(**{**SHAPES["gpt2"], "n_embd": 32, "n_head": 2})).eval()
    with pytest.raises(GptlabError, match="belongs to another base"):
        peft_format.load_adapter(tmp_path / "adapter", other)
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(GptlabError, match="use_dora"):
        peft_format.load_adapter(tmp_path / "adapter", GPT(model.config))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_trains_the_adapters_through_a_frozen_quantized_base(mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["llama-gqa"])).train()
    quantize_model(model, mode, 32, exclude=("lm_head",))
    lora.add_lora(model, "all", 4, 8.0, 0.0)
    codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    opt = make_optimizer(model, dataclasses.replace(FINETUNE_OPTIM, lr=1e-2), "cpu")
    x = tokens()
    losses = []
    for _ in range(3):
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(m.qweight, codes[n]) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    # the adapted quantized model is the dequantized float model with the same adapters, the kernels' rounding of
    # the activations aside: int16 per row for int8 weights, int8 codes per group of 32 for int4 (0.0085 at most
    # here; the kernels take every input, this 24-row one included, where past 16 rows the dequantized GEMM did)
    ref = GPT(model.config).eval()
    sd = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sd[f"{n}.weight"] = m.dequantized()
            if m.bias is not None:
                sd[f"{n}.bias"] = m.bias
    sd.update({k: v for k, v in model.state_dict().items() if not k.endswith(("qweight", "scales", "zeros"))})
    lora.attach(ref, ref.config, model.lora)
    ref.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol={"int8": 2e-3, "int4": 2e-2}[mode])


def test_the_input_gradient_through_a_quantized_layer_is_the_dequantized_matmuls():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    q = QuantLinear.from_weight(w, None, "int8")
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantized().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- adapters served per request
def adapter_set(tmp_path):
    """A GPT-2-shaped base and two PEFT adapters of different targets and ranks, saved."""
    from gptlab.checkpoint import save_model_checkpoint

    torch.manual_seed(0)
    base = GPT(GPTConfig(**{**SHAPES["gpt2"], "block_size": 96, "init_std": 0.1})).eval()
    save_model_checkpoint(tmp_path / "base", base.state_dict(), base.config, {"kind": "gpt2"})
    paths = {}
    for name, targets, rank in (("poet", "q,v", 4), ("clerk", "all", 8)):
        m = GPT(base.config).eval()
        m.load_state_dict(base.state_dict())
        lora.add_lora(m, targets, rank, 2.0 * rank, 0.0)
        with torch.no_grad():
            for a in lora.adapters(m).values():
                for b in a.B.values():
                    b.normal_(0, 0.3)
        paths[name] = peft_format.save_peft(m, tmp_path / name)
    return base, paths


def merged(base, path):
    m = GPT(base.config).eval()
    m.load_state_dict(base.state_dict())
    return lora.merge(peft_format.load_adapter(path, m))


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_rows_of_different_adapters_in_one_batch_equal_each_alone(tmp_path, sampling):
    import asyncio

    from gptlab.generate import Engine, Sampling
    from gptlab.serve.scheduler import Request, Scheduler
    from gptlab.tokenizer import from_spec

    base, paths = adapter_set(tmp_path)
    tok = from_spec({"kind": "gpt2"})
    served = GPT(base.config).eval()
    served.load_state_dict(base.state_dict())
    lora.attach_bank(served, [peft_format.read_adapter(p, served.config) for p in paths.values()])  # poet, clerk
    s = Sampling(temperature=0) if sampling == "greedy" else Sampling(temperature=1.0, top_k=50)
    prompts = [tok.encode(t) for t in ("The king said", "Once upon a time there", "A", "Numbers: 1, 2, 3,")]
    plan = [(p, k) for p in prompts for k in (0, 1, 2)]  # every prompt with the base and both adapters

    async def collect(sched, p, k):
        out = []
        async for c in sched.submit(Request(p, 16, s, seed=5, stop_ids=frozenset(), adapter=k)):
            out += c.tokens
        return out

    async def together(sched):
        return await asyncio.gather(*[collect(sched, p, k) for p, k in plan])

    sched = Scheduler(served, tok, max_batch=12)
    try:
        batched = asyncio.run(together(sched))
        assert sched.steps < len(plan) * 16  # they really were decoded together
        alone = [asyncio.run(collect(sched, p, k)) for p, k in plan]
    finally:
        sched.close()
    assert batched == alone
    # the independent reference: each adapter merged into the weights (W + alpha/r BA), generating on the Engine
    models = [base, merged(base, paths["poet"]), merged(base, paths["clerk"])]
    for (p, k), got in zip(plan, batched):
        want = Engine(models[k]).generate_tokens([p], 16, Sampling(**{**s.__dict__, "seed": 5}))[0].tokens
        assert got == want, (k, tok.decode(p))
    assert len({tuple(t) for t in batched[:3]}) == 3  # the adapters change the output


def test_the_server_lists_and_routes_adapters_and_refuses_a_bad_one(tmp_path):
    pytest.importorskip("openai")
    from gptlab.generate import Engine, Sampling

    from .conftest import Served, run_cli

    base, paths = adapter_set(tmp_path)
    s = Served(tmp_path / "base", "--lora", f"poet={paths['poet']}", "--lora", f"clerk={paths['clerk']}")
    try:
        client = s.client()
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "poet", "clerk"} and models["poet"].parent == "base"
        from gptlab.tokenizer import from_spec

        tok = from_spec({"kind": "gpt2"})
        for name, model in (("base", base), ("poet", merged(base, paths["poet"])),
                            ("clerk", merged(base, paths["clerk"]))):  # fmt: skip
            r = client.completions.create(model=name, prompt="The king said", max_tokens=12, temperature=0)
            want = Engine(model, tok).generate(["The king said"], 12, Sampling(temperature=0))[0].text
            assert r.model == name and r.choices[0].text == want
        import openai

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nobody", prompt="x", max_tokens=2)
    finally:
        s.stop()
    # an adapter trained on another base (other widths): one line, exit 2, at start-up
    other = GPT(GPTConfig(**{**SHAPES["gpt2"], "n_embd": 32, "n_head": 2})).eval()
    lora.add_lora(other, "q", 2, 2.0, 0.0)
    peft_format.save_peft(other, tmp_path / "wrong")
    r = run_cli("serve", str(tmp_path / "base"), "--port", "0", "--device", "cpu", "--lora", f"w={tmp_path / 'wrong'}",
                timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--lora w=" in r.stderr and "another base" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
