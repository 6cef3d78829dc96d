"""Mixture-of-experts layers against independent references: the dense block, a naive per-token loop (the definition's
sketch), the documented capacity policy, hand-computed auxiliary losses, the planner's accounting, and training
invariants (resume, two processes, compile)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab.config import GPTConfig, preset
from gptlab.errors import GptlabError
from gptlab.generate import Engine, Sampling
from gptlab.model import GPT, MLP, MoE
from gptlab.plan import Shape, params, resolve
from gptlab.train.trainer import train

from .conftest import ENV, losses, tiny_cfg, torchrun

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50, n_experts=4, experts_per_token=2)


def moe(**kw):
    torch.manual_seed(0)
    m = MoE(CFG.replace(**kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def reference(m: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """The definition as a per-token loop (Shazeer et al. 2017; GShard): softmax over experts, top-k, renormalize,
    sum prob * expert(x). ``keep``:
    a set of (token, expert) assignments allowed (the rest contribute nothing)."""
    x2 = x.reshape(-1, x.size(-1))
    out = torch.zeros_like(x2)
    for t in range(x2.size(0)):
        probs = F.softmax(m.router.weight @ x2[t], -1)
        top = probs.topk(m.k)
        for p, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            if keep is not None and (t, e) not in keep:
                continue
            h = F.gelu(x2[t] @ m.fc_weight[e] + m.fc_bias[e], approximate="tanh")
            out[t] += p * (h @ m.proj_weight[e] + m.proj_bias[e])
    return out.view_as(x)


def test_one_expert_top1_equals_the_dense_block():
    cfg = CFG.replace(n_experts=1, experts_per_token=1)
    torch.manual_seed(0)
    dense, routed = MLP(cfg), MoE(cfg)
    with torch.no_grad():
        routed.fc_weight[0] = dense.c_fc.weight.t()
        routed.fc_bias[0] = dense.c_fc.bias
        routed.proj_weight[0] = dense.c_proj.weight.t()
        routed.proj_bias[0] = dense.c_proj.bias
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(routed(x), dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_dropless_routing_equals_a_per_token_loop(training):
    m = moe(capacity_factor=100.0).train(training)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-5, atol=1e-5)
    assert m.stats["dropped_fraction"] == 0 and m.stats["expert_fraction"].sum() == pytest.approx(1.0)


def test_capacity_drops_exactly_what_the_policy_drops():
    m = moe(capacity_factor=0.5).train()
    x = torch.randn(1, 12, 16)
    N, k, E = 12, 2, 4
    cap = math.ceil(0.5 * N * k / E)  # 3 assignments per expert
    top = F.softmax(x[0] @ m.router.weight.t(), -1).topk(k).indices
    # Policy: every token's first choice, in token order, before any second choice; each expert keeps its first
    # `cap` assignments.
    taken, keep = dict.fromkeys(range(E), 0), set()
    for slot in range(k):
        for t in range(N):
            e = top[t, slot].item()
            if taken[e] < cap:
                keep.add((t, e))
                taken[e] += 1
    assert len(keep) < N * k  # this draw does drop something
    torch.testing.assert_close(m(x), reference(m, x, keep), rtol=1e-5, atol=1e-5)
    assert m.stats["dropped_fraction"].item() == pytest.approx(1 - len(keep) / (N * k))
    m.eval()  # evaluation and generation are dropless
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-5, atol=1e-5)


def test_auxiliary_losses_on_a_hand_computed_case():
    m = moe(n_experts=2, experts_per_token=1, aux_loss_weight=0.1, z_loss_weight=0.01)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0  # logits = [x0, 0]
    x = torch.zeros(1, 4, 16)
    x[0, :, 0] = torch.tensor([2.0, 1.0, -3.0, 1.0])
    m(x)
    p0 = [1 / (1 + math.exp(-v)) for v in (2.0, 1.0, -3.0, 1.0)]  # softmax([v, 0])[0]
    f = [3 / 4, 1 / 4]  # tokens 0, 1, 3 choose expert 0
    P = [sum(p0) / 4, 1 - sum(p0) / 4]
    balance = 2 * (f[0] * P[0] + f[1] * P[1])
    z = sum(math.log(math.exp(v) + 1) ** 2 for v in (2.0, 1.0, -3.0, 1.0)) / 4
    assert m.stats["balance_loss"].item() == pytest.approx(balance, rel=1e-6)
    assert m.stats["z_loss"].item() == pytest.approx(z, rel=1e-6)
    assert m.aux_loss.item() == pytest.approx(0.1 * balance + 0.01 * z, rel=1e-6)
    # perfectly balanced routing gives the minimum, 1
    x[0, :, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0])
    m(x)
    assert m.stats["balance_loss"].item() == pytest.approx(2 * 0.5 * 0.5 * 2, rel=1e-6)


def test_router_gets_gradients_and_the_model_counts_total_and_active():
    cfg = CFG.replace(n_layer=4, moe_every=2, shared_expert=True, expert_ff=24)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, 50, (4, 32))
    _, loss = model(idx, torch.randint(0, 50, (4, 32)))
    loss.backward()
    routed = model.moe_layers()
    assert [type(b.mlp).__name__ for b in model.h] == ["MLP", "MoE", "MLP", "MoE"] and len(routed) == 2
    assert all(m.router.weight.grad.abs().sum() > 0 for m in routed)
    model.eval()
    _, eval_loss = model(idx, idx)
    model.train()
    _, train_loss = model(idx, idx)
    # dropless and without dropout, training only adds the routers' weighted auxiliary losses (mean over layers)
    assert train_loss.item() == pytest.approx(eval_loss.item() + sum(m.aux_loss.item() for m in routed) / 2, rel=1e-6)
    counted = model.num_params(breakdown=True)
    planned = params(Shape.from_config(cfg))
    assert {k: planned[k] for k in counted} == counted
    expert = 2 * 16 * 24 + 24 + 16
    assert counted["total"] - counted["active"] == 2 * (4 - 2) * expert


def test_generation_with_moe_uses_the_cache_exactly():
    torch.manual_seed(0)
    model = GPT(CFG.replace(init_std=0.3)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    engine = Engine(model)
    greedy = Sampling(temperature=0)
    batched = [c.tokens for c in engine.generate_tokens(prompts, 20, greedy)]
    alone = [engine.generate_tokens([p], 20, greedy)[0].tokens for p in prompts]
    assert batched == alone
    assert Engine(model, compile=True).generate_tokens(prompts[:1], 20, greedy)[0].tokens == alone[0]
    seq = prompts[0] + alone[0]
    with torch.no_grad():
        full, _ = model(torch.tensor([seq[:-1]]))
    assert full[0, len(prompts[0]) - 1 :].argmax(-1).tolist() == alone[0]


def test_hf_export_of_moe_is_a_clear_error(tmp_path):
    from gptlab.interop.hf import save_hf

    model = GPT(CFG)
    with pytest.raises(GptlabError, match="mixture-of-experts"):
        save_hf(model.state_dict(), CFG, {"kind": "char", "chars": "abc"}, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gpt4_leaked_figures_arithmetic():
    # The leaked GPT-4 figures are ~1.8T total, ~220B active, "8 experts, top-2". With 8 experts and top-2 at least
    # a quarter of the expert weights are active, so 1.8T total means >= 450B active minus nothing shared: the two
    # numbers cannot both hold. A stated 16-expert top-2 config (120 layers, d 12288, 8 kv heads, d_ff 3d,
    # 100k vocabulary) gives ~1.8T total and ~0.26T active, the ballpark of the reports.
    s = Shape(
        n_layer=120,
        d_model=12288,
        n_head=96,
        n_kv_head=8,
        d_ff=3 * 12288,
        n_ctx=8192,
        vocab_size=100_000,
        n_experts=16,
        experts_per_token=2,
    )
    p = params(s)
    assert 1.7e12 < p["total"] < 1.85e12 and 0.24e12 < p["active"] < 0.28e12
    eight = s.replace(n_experts=8)
    experts = params(eight)["mlp"] - 120 * 12288 * 8
    assert params(eight)["active"] >= experts * 2 / 8
    assert params(resolve("gpt2", n_experts=8, experts_per_token=2))["active"] == 181_182_720


def _moe_flags(**kw):
    return {"n_experts": 4, "experts_per_token": 2, **kw}


def test_resumed_moe_run_equals_the_uninterrupted_one(char_data, tmp_path):
    kw = dict(
        max_iters=20,
        lr_decay_iters=20,
        eval_interval=10,
        checkpoint_interval=10,
        model_overrides=_moe_flags(capacity_factor=1.5),
    )  # the same schedule whatever max_iters
    train(tiny_cfg(char_data, tmp_path / "full", **kw), progress=False)
    train(tiny_cfg(char_data, tmp_path / "part", **{**kw, "max_iters": 10}), progress=False)
    train(tiny_cfg(char_data, tmp_path / "part", **kw), resume=True, progress=False)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["moe_expert_fraction"] for r in rows if "moe_expert_fraction" in r]
    assert fractions and len(fractions[-1]) == 2 and all(sum(f) == pytest.approx(1) for f in fractions[-1])


@pytest.mark.slow
def test_two_process_ddp_moe_matches_one_process(char_data, tmp_path):
    common = [
        "--data",
        str(char_data),
        "--model",
        "tiny",
        "--block-size",
        "32",
        "--max-iters",
        "10",
        "--log-interval",
        "1",
        "--eval-interval",
        "10",
        "--eval-iters",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--final-eval-tokens",
        "2000",
        "--dtype",  # not auto: its probe times each process's own batch, 8 rows here and 4 there
        "float32",
        "--json",
        "--set",
        "n_experts=4",
        "--set",
        "experts_per_token=2",
        "--set",
        "aux_loss_weight=0",
    ]  # the balance loss is per batch
    one = subprocess.run(
        [sys.executable, "-m", "gptlab", "train", "--out-dir", str(tmp_path / "one"), "--batch-size", "8", *common],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("train", "--out-dir", str(tmp_path / "two"), "--batch-size", "4", *common, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    np.testing.assert_allclose(
        [v for _, v in losses(tmp_path / "two")], [v for _, v in losses(tmp_path / "one")], rtol=2e-5
    )


@pytest.mark.slow
def test_compiled_and_bf16_moe_training_run(char_data, tmp_path):
    kw = dict(
        max_iters=3,
        eval_interval=3,
        eval_iters=1,
        checkpoint_interval=0,
        final_eval_tokens=500,
        model_overrides=_moe_flags(),
    )
    train(tiny_cfg(char_data, tmp_path / "eager", **kw), progress=False)
    train(tiny_cfg(char_data, tmp_path / "compiled", compile=True, **kw), progress=False)
    np.testing.assert_allclose(
        [v for _, v in losses(tmp_path / "compiled")], [v for _, v in losses(tmp_path / "eager")], rtol=1e-4
    )
    torch.manual_seed(0)
    model = GPT(preset("tiny", n_experts=4, experts_per_token=2)).train()
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.moe_layers()[0].fc_weight.grad is not None
