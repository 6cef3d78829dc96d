"""Fine-tuning and alignment: each objective against an independent computation on fixed tensors, the SFT masks,
packing, GPT-1 heads, and the stages end to end (exact resume, a huge KL coefficient pinning PPO to the reference,
a reward model learning a stated rule)."""

import contextlib
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.align.config import AlignConfig
from gptlab.align.data import batch_examples, pack_examples, preferences, sft_examples
from gptlab.align.losses import AdaptiveKL, bradley_terry_loss, dpo_loss, gae, kl_penalty, ppo_losses, ranking_pairs
from gptlab.align.stages import Finetune, load_init
from gptlab.align.trainer import train_stage
from gptlab.checkpoint import list_checkpoints
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.metrics import read_rows
from gptlab.tokenizer import CharTokenizer
from gptlab.train.config import TrainConfig
from gptlab.train.distributed import Dist
from gptlab.train.trainer import train

from .conftest import torchrun

WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "my", "lord"]


# ----------------------------------------------------------------------------- objectives on fixed tensors
def test_bradley_terry_and_ranking_pairs():
    rc, rr = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.1, 2.0])
    hand = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(rc.tolist(), rr.tolist())) / 3
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(hand, rel=1e-6)
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # K(K-1)/2, better first


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.5, -3.5]))
    beta = 0.3
    loss, chosen, _rejected = dpo_loss(pc, pr, rc, rr, beta)
    z = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert loss.item() == pytest.approx(np.mean([-math.log(1 / (1 + math.exp(-x))) for x in z]), rel=1e-6)
    assert chosen.tolist() == pytest.approx([beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())])


def test_gae_matches_the_discounted_sum_of_td_errors():
    torch.manual_seed(0)
    r, v = torch.randn(3, 7), torch.randn(3, 7)
    mask = torch.zeros(3, 7)
    mask[0, 2:7] = 1
    mask[1, 0:4] = 1
    mask[2, 3:5] = 1
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, mask, gamma, lam)
    for b in range(3):
        idx = mask[b].nonzero().flatten().tolist()
        for n, t in enumerate(idx):
            want = 0.0
            for m, s in enumerate(idx[n:]):  # A_t = sum_l (γλ)^l δ_{t+l}, V after the last token = 0
                nxt = v[b, idx[n + m + 1]].item() if n + m + 1 < len(idx) else 0.0
                want += (gamma * lam) ** m * (r[b, s].item() + gamma * nxt - v[b, s].item())
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + v[b, t].item(), abs=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_ppo_clipped_objectives_match_elementwise_computation():
    torch.manual_seed(1)
    logp, old = torch.randn(2, 5) * 0.3, torch.randn(2, 5) * 0.3
    adv, vals, old_v, ret = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    eps, eps_v = 0.2, 0.3
    out = ppo_losses(logp, old, adv, vals, old_v, ret, mask, eps, eps_v)
    pol, val, clipped = [], [], []
    for b, t in itertools.product(range(2), range(5)):
        if not mask[b, t]:
            continue
        ratio = math.exp(logp[b, t] - old[b, t])
        a = adv[b, t].item()
        pol.append(-min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a))
        vc = old_v[b, t].item() + min(max(vals[b, t].item() - old_v[b, t].item(), -eps_v), eps_v)
        val.append(0.5 * max((vals[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2))
        clipped.append(abs(ratio - 1) > eps)
    assert out["policy_loss"].item() == pytest.approx(np.mean(pol), rel=1e-5)
    assert out["value_loss"].item() == pytest.approx(np.mean(val), rel=1e-5)
    assert out["clipfrac"].item() == pytest.approx(np.mean(clipped))


def test_kl_estimators_are_unbiased_for_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert kl_penalty(logp, logq, kind).mean().item() == pytest.approx(exact, rel=0.02)
    assert (kl_penalty(logp, logq, "k3") >= 0).all()


def test_adaptive_kl_controller():
    kl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    kl.update(9.0, 256)  # error = clip(9/6 - 1, ±0.2) = 0.2
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    kl.update(5.4, 100)  # error = -0.1
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 100 / 10_000))
    fixed = AdaptiveKL(0.1)
    fixed.update(100.0, 1000)
    assert fixed.coef == 0.1


# ----------------------------------------------------------------------------- data, masks, packing
def test_sft_masks_prompt_and_chat_template(tmp_path):
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyzSUA: \n.")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"prompt": "ab ", "response": "cd."})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n"
    )
    plain, chat = sft_examples(tmp_path / "d.jsonl", tok, 64)
    assert plain.ids == tok.encode("ab cd.") + [tok.eot_id] and plain.loss_mask == [0, 0, 0, 1, 1, 1, 1]
    assert tok.decode(chat.ids[:-1]) == "System: be\nUser: hi\nAssistant: yo\n" and chat.ids[-1] == tok.eot_id
    trained = tok.decode(t for t, m in zip(chat.ids, chat.loss_mask) if m)
    assert trained == "yo\n" + tok.decode([tok.eot_id])
    with pytest.raises(GptlabError, match="longer than the model's context of 4"):
        sft_examples(tmp_path / "d.jsonl", tok, 4)


@pytest.fixture(scope="module")
def base_run(char_data, tmp_path_factory):
    """A tiny char-level model pre-trained briefly on the synthetic corpus, and data files in its alphabet."""
    root = tmp_path_factory.mktemp("align")
    train(
        TrainConfig.from_sources(
            None,
            data=str(char_data),
            out_dir=str(root / "base"),
            model="tiny",
            block_size=64,
            batch_size=16,
            max_iters=120,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=10,
            eval_interval=60,
            eval_iters=2,
            checkpoint_interval=120,
            device="cpu",
            threads=1,
            final_eval_tokens=2000,
        ),
        progress=False,
    )
    rng = np.random.default_rng(0)
    say = lambda k: " ".join(rng.choice(WORDS, k))
    rows = [{"prompt": say(3) + " ", "response": say(2) + "."} for _ in range(48)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = []
    for _ in range(96):  # the stated rule: more letters "o" is better
        resp = sorted((say(k) + "." for k in (1, 2, 3)), key=lambda r: -r.count("o"))
        if len({r.count("o") for r in resp}) == 3:
            prefs.append({"prompt": say(3) + " ", "ranked": resp})
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": say(3) + " "}) + "\n" for _ in range(32)))
    return root


def cfg(root, stage, **kw):
    base = dict(
        stage=stage,
        model=str(root / "base"),
        out_dir=str(root / kw.pop("name", stage)),
        device="cpu",
        threads=1,
        lr=1e-3,
        warmup_iters=2,
        eval_interval=1000,
        log_interval=1,
        checkpoint_interval=1000,
    )
    return AlignConfig.from_sources(None, **{**base, **kw})


def test_prompt_tokens_get_zero_gradient(base_run):
    model, tok = load_init(str(base_run / "base"), "cpu")
    ex = sft_examples(base_run / "sft.jsonl", tok, 64)[:3]
    b = batch_examples(ex)
    grads = {}

    def keep_grad(module, inputs, out):
        out.register_hook(lambda g: grads.setdefault("h", g))

    model.ln_f.register_forward_hook(keep_grad)
    model(b["x"], b["y"])[1].backward()
    per_pos = grads["h"].abs().sum(-1)  # [B, T]: the loss's gradient at each position's output
    assert (per_pos[b["y"] == -1] == 0).all() and (per_pos[b["y"] >= 0] > 0).all()


def test_packed_examples_do_not_attend_across_boundaries(base_run):
    model, tok = load_init(str(base_run / "base"), "cpu")
    model.eval()
    ex = sft_examples(base_run / "sft.jsonl", tok, 64)[:6]
    packed = pack_examples(ex, 64)
    assert packed["x"].size(0) < len(ex)  # several examples share a row
    logits, _ = model(packed["x"], doc_ids=packed["doc_ids"])
    for row in range(packed["x"].size(0)):
        for k in packed["doc_ids"][row].unique().tolist():
            if k < 0:
                continue
            pos = (packed["doc_ids"][row] == k).nonzero().flatten()
            alone, _ = model(torch.tensor([ex[k].ids[:-1]]))
            torch.testing.assert_close(logits[row, pos], alone[0], atol=1e-5, rtol=1e-5)
    padded = batch_examples(ex)
    assert model(packed["x"], packed["y"], doc_ids=packed["doc_ids"])[1].item() == pytest.approx(
        model(padded["x"], padded["y"])[1].item(), rel=1e-5
    )


def test_gpt1_similarity_is_order_symmetric_and_tasks_train(base_run, tmp_path):
    rows = [{"a": "the king", "b": "my lord", "label": "same"}, {"a": "war", "b": "love and war", "label": "diff"}]
    (tmp_path / "sim.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    st = Finetune(cfg(base_run, "finetune", data=str(tmp_path / "sim.jsonl"), task="similarity", val_frac=0), Dist())
    assert st.gpt.config.vocab_size == st.base_vocab + 3 and st.labels == ["diff", "same"]
    item = st.train[0]
    swapped = type(item)(item.sequences[::-1], item.label)
    st.module.eval()
    torch.testing.assert_close(st.forward([item])[0][0], st.forward([swapped])[0][0])
    # classification learns a keyword rule; the tuned model still samples (new vocabulary rows included)
    rng = np.random.default_rng(1)
    cls = [" ".join(rng.choice(WORDS, 4)) for _ in range(80)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"text": t, "label": "war" in t}) + "\n" for t in cls))
    s = train_stage(
        cfg(
            base_run,
            "finetune",
            name="ft",
            data=str(tmp_path / "cls.jsonl"),
            max_iters=60,
            batch_size=16,
            val_frac=0.25,
        ),
        progress=False,
    )
    assert s["eval"]["accuracy"] >= 0.85
    assert main(["sample", s["out_dir"], "--prompt", "the", "--max-new-tokens", "5"]) == 0


def interrupted_and_resumed(c):
    """Run ``c``, lose everything after its first checkpoint (as a crash would), resume it."""
    train_stage(c, progress=False)
    for checkpoint_dir in list_checkpoints(Path(c.out_dir))[1:]:
        shutil.rmtree(checkpoint_dir)
    return train_stage(c, resume=True, progress=False)


def test_sft_resumes_exactly_and_packing_changes_nothing(base_run):
    full = train_stage(
        cfg(base_run, "sft", name="sft-full", data=str(base_run / "sft.jsonl"), max_iters=8, checkpoint_interval=4),
        progress=False,
    )
    again = interrupted_and_resumed(
        cfg(base_run, "sft", name="sft-cut", data=str(base_run / "sft.jsonl"), max_iters=8, checkpoint_interval=4)
    )
    packed = train_stage(
        cfg(base_run, "sft", name="sft-pack", data=str(base_run / "sft.jsonl"), max_iters=8, pack=True), progress=False
    )
    rows = lambda s: [r["loss"] for r in read_rows(Path(s["metrics"])) if "loss" in r]
    assert again["resumed_from"] == 4 and rows(again) == rows(full)
    assert rows(packed) == pytest.approx(rows(full), rel=1e-4)


@pytest.mark.slow
def test_reward_model_learns_the_rule_then_ppo_and_dpo(base_run, char_data):
    rm = train_stage(
        cfg(
            base_run,
            "reward",
            data=str(base_run / "prefs.jsonl"),
            max_iters=60,
            batch_size=8,
            val_frac=0.25,
            center_rewards=0.01,
        ),
        progress=False,
    )
    assert rm["eval"]["pair_accuracy"] >= 0.85  # held-out pairs ranked by the rule
    kw = dict(
        data=str(base_run / "prompts.jsonl"),
        reward_model=rm["out_dir"],
        batch_size=16,
        max_new_tokens=16,
        max_iters=10,
        lr=5e-4,
        val_frac=0.25,
    )
    free = train_stage(cfg(base_run, "ppo", name="ppo-free", kl_coef=0.0, **kw), progress=False)
    pinned = train_stage(cfg(base_run, "ppo", name="ppo-pinned", kl_coef=1e3, **kw), progress=False)
    rows = lambda s: [r for r in read_rows(Path(s["metrics"])) if "score" in r]
    assert rows(free)[-1]["score"] > rows(free)[0]["score"]  # PPO raises the reward
    # with a huge coefficient the policy stays at the reference: the KL is far below the unpenalised run's
    assert abs(pinned["eval"]["kl"]) < 0.25 * abs(free["eval"]["kl"])
    # exact resume, including the rollouts and the adaptive KL coefficient
    adapt = dict(
        kw,
        kl_coef=0.05,
        kl_target=0.5,
        kl_horizon=100,
        max_iters=4,
        checkpoint_interval=2,
        ptx_coef=0.5,
        ptx_data=str(char_data),
    )
    a = train_stage(cfg(base_run, "ppo", name="ppo-a", **adapt), progress=False)
    b = interrupted_and_resumed(cfg(base_run, "ppo", name="ppo-b", **adapt))
    assert b["resumed_from"] == 2 and rows(a) == rows(b) and rows(a)[-1]["kl_coef"] != 0.05
    assert all(r["ptx_loss"] > 0 for r in rows(a))  # PPO-ptx mixes in the pre-training loss
    dpo = train_stage(
        cfg(base_run, "dpo", data=str(base_run / "prefs.jsonl"), max_iters=30, batch_size=8, val_frac=0.25, beta=0.5),
        progress=False,
    )
    assert dpo["eval"]["pair_accuracy"] >= 0.7


@pytest.mark.slow
def test_torchrun_matches_one_process_with_the_same_global_batch(base_run):
    one = train_stage(
        cfg(
            base_run,
            "reward",
            name="rm-one",
            data=str(base_run / "prefs.jsonl"),
            max_iters=6,
            batch_size=8,
            val_frac=0.25,
        ),
        progress=False,
    )
    out = base_run / "rm-ddp"
    run = torchrun(
        "align",
        "reward",
        str(base_run / "base"),
        "--data",
        str(base_run / "prefs.jsonl"),
        "--out-dir",
        str(out),
        "--max-iters",
        "6",
        "--batch-size",
        "4",
        "--val-frac",
        "0.25",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--lr",
        "1e-3",
        "--warmup-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "1000",
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = lambda m: [r["loss"] for r in read_rows(Path(m)) if "loss" in r]
    assert rows(out / "metrics.jsonl") == pytest.approx(rows(one["metrics"]), rel=1e-4)
    assert json.loads(run.stdout)["world_size"] == 2  # one summary, from rank 0 only


def test_hh_rlhf_layout_splits_the_shared_prompt(tmp_path):
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyzHA: \n.")
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: hello.", "rejected": "\n\nHuman: hi\n\nAssistant: go."}
    (tmp_path / "hh.jsonl").write_text(json.dumps(rec) + "\n")
    (pref,) = preferences(tmp_path / "hh.jsonl", tok, 64)
    assert tok.decode(pref.prompt) == "\n\nHuman: hi\n\nAssistant:" and pref.pairs == [(0, 1)]
    assert [tok.decode(r[:-1]) for r in pref.responses] == [" hello.", " go."]


def test_bad_alignment_input_is_a_clear_error(base_run, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(GptlabError, match='needs "chosen" and "rejected"'):
        preferences(tmp_path / "bad.jsonl", CharTokenizer("x"), 64)
    with pytest.raises(GptlabError, match="ppo needs reward_model"):
        AlignConfig(stage="ppo", data="d.jsonl", model="m")
    assert (
        main(
            [
                "align",
                "ppo",
                str(base_run / "base"),
                "--data",
                str(base_run / "prompts.jsonl"),
                "--reward-model",
                str(base_run / "base"),
                "--out-dir",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "is not a reward model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA and QLoRA on every training path
def test_lora_sft_resumes_exactly_leaves_the_base_and_merges_to_the_same_logits(base_run, tmp_path):
    from gptlab import lora
    from gptlab.checkpoint import load_checkpoint
    from gptlab.loader import load_model

    kw = dict(data=str(base_run / "sft.jsonl"), max_iters=6, checkpoint_interval=3, lora_rank=4, lora_alpha=8.0,
              lr=5e-3)  # fmt: skip
    full = train_stage(cfg(base_run, "sft", name="lora-full", **kw), progress=False)
    again = interrupted_and_resumed(cfg(base_run, "sft", name="lora-cut", **kw))
    rows = lambda s: [r["loss"] for r in read_rows(Path(s["metrics"])) if "loss" in r]
    assert again["resumed_from"] == 3 and rows(again) == rows(full)
    assert full["trainable_params"] < full["params"] / 10 and rows(full)[-1] < rows(full)[0]
    tuned, meta = load_checkpoint(full["out_dir"])
    base = load_model(str(base_run / "base"), "cpu").model
    base_sd = base.state_dict()
    assert meta["lora"]["roles"]["q"] == [4, 8.0]
    assert all(torch.equal(v, base_sd[k]) for k, v in tuned.state_dict().items() if ".lora." not in k)
    assert (Path(full["adapter"]) / "adapter_model.safetensors").is_file()
    # gptlab convert BASE --lora ADAPTER and gptlab convert RUN --merge-lora give the adapted model's logits
    x = torch.randint(0, base.config.vocab_size, (2, 20))
    want = tuned(x)[0]
    assert main(["convert", str(base_run / "base"), "--lora", full["adapter"], "--out-dir", str(tmp_path / "m1"),
                 "--to", "gptlab"]) == 0  # fmt: skip
    assert main(["convert", full["out_dir"], "--merge-lora", "--out-dir", str(tmp_path / "m2"), "--to", "gptlab"]) == 0
    for merged in ("m1", "m2"):
        model, m = load_checkpoint(tmp_path / merged)
        assert not lora.adapters(model) and "lora" not in m
        torch.testing.assert_close(model(x)[0], want, rtol=0, atol=1e-5)
    assert main(["sample", full["out_dir"], "--prompt", "the", "--max-new-tokens", "5"]) == 0


def test_qlora_and_lora_on_reward_dpo_train_and_distill(base_run, char_data, tmp_path):
    from gptlab.checkpoint import load_checkpoint
    from gptlab.distill.config import DistillConfig
    from gptlab.distill.trainer import distill
    from gptlab.quant.quantize import QuantLinear

    lo = dict(lora_rank=2, lora_alpha=4.0, max_iters=2, lr=1e-3)
    q = train_stage(cfg(base_run, "sft", name="qlora", data=str(base_run / "sft.jsonl"), quantize="int4", **lo),
                    progress=False)  # fmt: skip
    model, meta = load_checkpoint(q["out_dir"])
    assert meta["quantization"]["mode"] == "int4" and isinstance(model.h[0].attn.c_attn, QuantLinear)
    assert q["trainable_params"] < q["params"] / 10
    # QLoRA from a quantized checkpoint (gptlab quantize: the head too, feeding the tied embedding)
    assert main(["quantize", str(base_run / "base"), "--mode", "int8", "--out-dir", str(tmp_path / "q8")]) == 0
    q2 = train_stage(cfg(base_run, "sft", name="qlora-ckpt", model=str(tmp_path / "q8"), data=str(base_run /
                         "sft.jsonl"), **lo), progress=False)  # fmt: skip
    assert load_checkpoint(q2["out_dir"])[1]["quantization"]["mode"] == "int8" and math.isfinite(q2["eval"]["loss"])
    rm = train_stage(
        cfg(base_run, "reward", name="lora-reward", data=str(base_run / "prefs.jsonl"), **lo), progress=False
    )
    assert rm["trainable_params"] < rm["params"] / 5  # adapters and the scalar head
    dpo = train_stage(cfg(base_run, "dpo", name="lora-dpo", data=str(base_run / "prefs.jsonl"), **lo), progress=False)
    assert math.isfinite(dpo["eval"]["loss"])
    common = dict(data=str(char_data), init=str(base_run / "base"), block_size=64, batch_size=4, max_iters=4,
                  checkpoint_interval=2, eval_interval=2, eval_iters=1, final_eval_tokens=500, device="cpu",
                  threads=1, lora_rank=2, lora_alpha=4.0)  # fmt: skip
    t = train(TrainConfig.from_sources(None, out_dir=str(tmp_path / "t"), **common), progress=False)
    assert (Path(t["out_dir"]) / "adapter" / "adapter_config.json").is_file()
    shutil.rmtree(list_checkpoints(Path(t["out_dir"]))[-1])
    t2 = train(TrainConfig.from_sources(None, out_dir=str(tmp_path / "t"), **common), resume=True, progress=False)
    assert t2["resumed_from"] == 2 and t2["final_val_loss"] == t["final_val_loss"]
    d = distill(DistillConfig.from_sources(None, out_dir=str(tmp_path / "d"), teacher=str(base_run / "base"), **common),
                progress=False)  # fmt: skip
    assert math.isfinite(d["final_val_loss"])
    with pytest.raises(GptlabError, match="needs --lora-rank"):
        AlignConfig.from_sources(None, stage="sft", data="d", model="m", quantize="int8")


# ----------------------------------------------------------------------------- RL with verifiable rewards (GRPO family)
def test_group_advantages_by_hand():
    from gptlab.align.losses import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # the sample std of (1, 0, 0, 1)
    g = group_advantages(r, 4, "grpo")
    assert g[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4),
                                            0.5 / (std + 1e-4)], rel=1e-6)  # fmt: skip
    assert g[4:8].tolist() == [0.0] * 4  # a group with equal rewards teaches nothing
    assert group_advantages(r, 4, "dr_grpo")[8:].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    # RLOO: r_i minus the mean of the other three
    assert group_advantages(r, 4, "rloo")[8:].tolist() == pytest.approx([3 - 5 / 3, 1 - 7 / 3, 2 - 2, 2 - 2])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "rloo"])
def test_grpo_losses_equal_the_hand_computation(loss_type):
    from gptlab.align.losses import grpo_loss

    logp = torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-0.3, -1.2, 0.0, 0.0]])
    old = torch.tensor([[-1.4, -0.5, -1.0, 0.0], [-0.3, -0.2, 0.0, 0.0]])
    ref = torch.tensor([[-1.1, -0.7, -1.5, 0.0], [-0.4, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([1.5, -0.8])
    lo, hi, beta, max_tokens = 0.2, 0.28, 0.05, 4
    out = grpo_loss(logp, old, adv, mask, loss_type, lo, hi, max_tokens, ref, beta)
    per_seq, tokens, low, high = [], [], 0, 0
    for i in range(2):
        seq = []
        for t in range(4):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            clipped = min(max(rho, 1 - lo), 1 + hi)
            d = (ref[i, t] - logp[i, t]).item()
            seq.append(-min(rho * a, clipped * a) + beta * (math.exp(d) - d - 1))
            low += rho < 1 - lo and a < 0
            high += rho > 1 + hi and a > 0
        per_seq.append(seq)
        tokens += seq
    want = {
        "grpo": sum(sum(s) / len(s) for s in per_seq) / 2,
        "dapo": sum(tokens) / len(tokens),
        "dr_grpo": sum(tokens) / (2 * max_tokens),
        "rloo": sum(sum(s) for s in per_seq) / 2,
    }[loss_type]
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert out["clip_ratio_low"].item() == pytest.approx(low / 5) and out["clip_ratio_high"].item() == pytest.approx(
        high / 5
    )
    assert low + high >= 2  # the case exercises both clips


def test_the_rewards_read_answers_as_stated(tmp_path):
    from gptlab.align.rewards import parse_rewards, score

    fn = tmp_path / "mine.py"
    fn.write_text("def shout(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    rewards = parse_rewards(f"number,match=0.5,regex,format=0.2,{fn}:shout", r"\D*\d+")
    got = score(rewards, ["p"] * 4, ["so 1,234.", "41", "ABC", "12 then 7"],
                {"answer": ["1234", "41", "[A-Z]+", "7"], "ended": [True, True, False, True]})  # fmt: skip
    assert got["number"] == [1.0, 1.0, 0.0, 1.0]
    assert got["match"] == [0.0, 1.0, 0.0, 0.0]
    assert got["regex"] == [0.0, 1.0, 1.0, 0.0]  # "41" as a regex matches "41"
    assert got["format"] == [0.0, 1.0, 0.0, 0.0]  # ends by itself and is non-digits then digits
    assert got[f"{fn}:shout"] == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(GptlabError, match="unknown reward 'nope'"):
        parse_rewards("nope")


def test_rollout_logprobs_equal_the_trainers(base_run):
    from gptlab.align.stages import token_logprobs
    from gptlab.generate import Engine, Sampling

    model, tok = load_init(str(base_run / "base"), "cpu")
    prompts = [tok.encode("the king "), tok.encode("my lord doth speak of "), tok.encode("war")]
    for temperature in (1.0, 0.7):
        done = Engine(model).generate_tokens(prompts, 24, Sampling(temperature, seed=3), stop_ids=[tok.eot_id],
                                             logprobs=True)  # fmt: skip
        model.eval()
        for p, c in zip(prompts, done):
            seq = p + c.tokens + ([tok.eot_id] if c.finish_reason == "stop_token" else [])
            full = torch.tensor([seq])
            with torch.no_grad():
                logp, _ = token_logprobs(model, full[:, :-1], full[:, 1:], temperature)
            assert len(c.logprobs) == len(seq) - len(p)
            torch.testing.assert_close(torch.tensor(c.logprobs), logp[0, len(p) - 1 :], rtol=0, atol=1e-5)


def grpo_cfg(base_run, tmp_path, **kw):
    reward = tmp_path / "o_reward.py"
    reward.write_text("def o_share(prompts, completions, **kw):\n"
                      "    return [c.count('o') / max(len(c), 1) for c in completions]\n")  # fmt: skip
    base = dict(data=str(base_run / "prompts.jsonl"), rewards=f"{reward}:o_share", batch_size=4, group_size=4,
                max_new_tokens=12, max_iters=6, lr=3e-3, val_frac=0.25, minibatches=2)  # fmt: skip
    return cfg(base_run, "grpo", **{**base, **kw})


@pytest.mark.parametrize("loss_type", ["dapo", "rloo"])
def test_grpo_trains_logs_what_trl_logs_and_resumes_exactly(base_run, tmp_path, loss_type):
    kw = dict(loss_type=loss_type, checkpoint_interval=3, lora_rank=4, lora_alpha=16.0, kl_beta=0.05)
    a = train_stage(grpo_cfg(base_run, tmp_path, name=f"grpo-a-{loss_type}", **kw), progress=False)
    b = interrupted_and_resumed(grpo_cfg(base_run, tmp_path, name=f"grpo-b-{loss_type}", **kw))
    rows = lambda s: [r for r in read_rows(Path(s["metrics"])) if "reward" in r and "step" in r and "loss" in r]
    assert b["resumed_from"] == 3 and rows(a) == rows(b)
    for r in rows(a):
        assert r["logprob_diff"] <= 1e-5  # the sampler is the trained model
        for key in ("reward_std", "frac_reward_zero_std", "clip_ratio", "completion_length", "entropy", "kl",
                    "clipped_completions"):  # fmt: skip
            assert key in r
    assert "reward" in a["eval"] and (Path(a["out_dir"]) / "adapter" / "adapter_config.json").is_file()


def test_grpo_stops_a_run_that_learns_nothing(base_run, tmp_path, capsys):
    from gptlab.align.grpo import GRPO

    (tmp_path / "flat.py").write_text("def zero(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    dead = grpo_cfg(base_run, tmp_path, name="dead", rewards=f"{tmp_path / 'flat.py'}:zero", stall_steps=2)
    with pytest.raises(GptlabError, match="every group's completions got equal rewards"):
        train_stage(dead, progress=False)
    # an update that never reaches the sampled model (TRL #5312): the weights do not change
    stage = GRPO(grpo_cfg(base_run, tmp_path, stall_steps=2), Dist())
    with pytest.raises(GptlabError, match="weights did not change for 2 steps"):
        for step in range(4):
            stage.step(step, lambda loss: None)
    # no completion ever ends: a loud warning
    stage = GRPO(grpo_cfg(base_run, tmp_path, stall_steps=1, max_new_tokens=1), Dist())
    with contextlib.suppress(GptlabError):  # one-token groups may also all score alike, which stops the run too
        stage.step(0, lambda loss: loss.backward())
    assert "no completion ended by itself" in capsys.readouterr().err
