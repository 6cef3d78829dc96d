"""Distillation: the divergences against hand computations on 2-5 token vocabularies, their limits, signs and
gradients; a student that is the teacher's copy; the job on the training loop (resume after SIGKILL, the top-k
cache, on-policy steps, the refusals)."""

import math
import subprocess
import sys

import pytest
import torch

from gptlab import checkpoint
from gptlab.distill import losses
from gptlab.distill.config import DistillConfig
from gptlab.distill.trainer import Distillation, distill, matched_layers
from gptlab.errors import GptlabError
from gptlab.metrics import read_rows
from gptlab.train import distributed
from gptlab.train.trainer import train

from .conftest import ENV, kill_once_written, run_cli, tiny_cfg
from .conftest import losses as run_losses

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def kl(a, b):
    """By hand: sum a_i log(a_i / b_i)."""
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def logits(probs, dtype=torch.float64):
    return torch.tensor(probs, dtype=dtype).log()


def test_forward_and_reverse_kl_equal_the_hand_computation_and_are_not_swapped():
    s, t = logits(Q), logits(P)
    fwd, rev = losses.forward_kl(s, t).item(), losses.reverse_kl(s, t).item()
    assert fwd == pytest.approx(kl(P, Q), rel=1e-12)  # KL(teacher || student) = 0.7 ln 3.5 + 0.2 ln 0.4 + 0.1 ln(1/3)
    assert rev == pytest.approx(kl(Q, P), rel=1e-12)
    assert abs(kl(P, Q) - kl(Q, P)) > 0.04  # the example tells the two directions apart: swapped, both asserts fail


def test_temperature_softens_both_distributions():
    s, t = logits(Q), logits(P)
    T = 3.0
    soft = lambda p: [x ** (1 / T) / sum(y ** (1 / T) for y in p) for x in p]
    assert losses.forward_kl(s, t, T).item() == pytest.approx(kl(soft(P), soft(Q)), rel=1e-12)


def test_jsd_equals_its_definition_with_the_mixture_of_probabilities():
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]  # a mixture of probabilities, not of log-probabilities
    by_hand = (beta * kl(P, m) + (1 - beta) * kl(Q, m)) / (beta * (1 - beta))
    assert losses.generalized_jsd(logits(Q), logits(P), beta).item() == pytest.approx(by_hand, rel=1e-12)
    log_space = [math.exp(beta * math.log(p) + (1 - beta) * math.log(q)) for p, q in zip(P, Q)]
    assert abs(by_hand - (beta * kl(P, log_space) + (1 - beta) * kl(Q, log_space)) / (beta * (1 - beta))) > 0.01


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jsd_is_continuous_at_both_ends_and_equals_the_kls_there(dtype):
    s, t = logits(Q, dtype), logits(P, dtype)
    fwd, rev = kl(P, Q), kl(Q, P)
    assert losses.generalized_jsd(s, t, 0.0).item() == pytest.approx(fwd, rel=1e-6)
    assert losses.generalized_jsd(s, t, 1.0).item() == pytest.approx(rev, rel=1e-6)
    for eps in (1e-2, 1e-3):
        assert losses.generalized_jsd(s, t, eps).item() == pytest.approx(fwd, rel=0.01)
        assert losses.generalized_jsd(s, t, 1 - eps).item() == pytest.approx(rev, rel=0.01)


def test_every_divergence_is_nonnegative_also_from_bf16_and_zero_only_for_equal_distributions():
    torch.manual_seed(0)
    base = torch.randn(64, 5) * 3
    near = base + 1e-3 * torch.randn(64, 5)  # nearly equal: where rounding would go negative
    for kind in losses.KINDS:
        for a, b in ((base, near), (base.bfloat16(), near.bfloat16()), (torch.randn(64, 5), base)):
            assert (losses.per_token(kind, a, b, 1.0, 0.4) >= 0).all(), kind
        same = losses.per_token(kind, base, base.clone(), 2.0, 0.4)
        assert same.abs().max().item() < 1e-6, kind
        assert (losses.per_token(kind, base, base.flip(-1), 1.0, 0.4) > 1e-3).all(), kind


@pytest.mark.parametrize("kind", losses.KINDS)
def test_gradients_match_finite_differences(kind):
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: losses.per_token(kind, x, t, 1.5, 0.3), (s,))


def test_sparse_forward_kl_with_every_token_equals_forward_kl_and_has_true_gradients():
    torch.manual_seed(0)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    values, indices = t.topk(5, -1)
    torch.testing.assert_close(losses.sparse_forward_kl(s, values, indices, 2.0), losses.forward_kl(s, t, 2.0))
    v3, i3 = t.topk(3, -1)
    assert torch.autograd.gradcheck(lambda x: losses.sparse_forward_kl(x, v3, i3, 1.0), (s,))


def test_a_two_token_case_by_hand():
    """V = 2: KL(Bernoulli(0.9) || Bernoulli(0.6)) = 0.9 ln 1.5 + 0.1 ln 0.25."""
    got = losses.forward_kl(logits([0.6, 0.4]), logits([0.9, 0.1])).item()
    assert got == pytest.approx(0.9 * math.log(1.5) + 0.1 * math.log(0.25), rel=1e-12)


def test_layer_mapping():
    assert matched_layers(6, 12) == [1, 3, 5, 7, 9, 11]  # every second teacher block, the last with the last
    assert matched_layers(4, 4) == [0, 1, 2, 3]
    assert matched_layers(2, 3) == [1, 2]


# ------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def teacher_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_cfg(char_data, out, max_iters=30, checkpoint_interval=30, eval_interval=30), progress=False)
    return out


def distill_cfg(data, out, teacher, **kw):
    base = dict(
        data=str(data),
        out_dir=str(out),
        teacher=str(teacher),
        model="tiny",
        block_size=32,
        batch_size=8,
        max_iters=8,
        lr=3e-3,
        warmup_iters=2,
        eval_interval=4,
        eval_iters=2,
        log_interval=1,
        checkpoint_interval=4,
        device="cpu",
        threads=1,
        final_eval_tokens=4_000,
    )
    base.update(kw)
    return DistillConfig.from_sources(None, **base)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_a_student_that_copies_the_teacher_has_zero_distillation_loss_and_gradient(
    char_data, teacher_run, tmp_path, kind
):
    cfg = distill_cfg(
        char_data, tmp_path / "s", teacher_run, init=str(teacher_run), kd_loss=kind, kd_weight=1.0, hidden_weight=1.0
    )
    job = Distillation(cfg, distributed.Dist(), resume=False)
    x, y = job.train_windows.batch(8, 0)
    loss = job.loss(x, y, 0, 0)
    loss.backward()
    kd, _, hidden = job.parts[-1].tolist()
    assert abs(kd) < 1e-6 and abs(hidden) < 1e-6 and abs(loss.item()) < 1e-5
    assert max(p.grad.abs().max().item() for p in job.raw.parameters() if p.grad is not None) < 1e-5


def test_distillation_trains_and_reports_the_teacher(char_data, teacher_run, tmp_path):
    s = distill(distill_cfg(char_data, tmp_path / "s", teacher_run, max_iters=12), progress=False)
    assert s["teacher_val_loss"] < 3.5 and math.isfinite(s["final_val_loss"])
    rows = read_rows(tmp_path / "s" / "metrics.jsonl")
    kd = [r["kd_loss"] for r in rows if "kd_loss" in r]
    assert len(kd) == 12 and kd[-1] < kd[0]  # the student moves towards the teacher


def test_the_top_k_cache_is_reused_by_a_second_student_with_identical_results(char_data, teacher_run, tmp_path):
    kw = dict(teacher_top_k=8, max_iters=4)
    distill(distill_cfg(char_data, tmp_path / "live", teacher_run, **kw), progress=False)
    first = distill(
        distill_cfg(char_data, tmp_path / "a", teacher_run, teacher_cache=str(tmp_path / "cache"), **kw), progress=False
    )
    second = distill(
        distill_cfg(char_data, tmp_path / "b", teacher_run, teacher_cache=str(tmp_path / "cache"), **kw), progress=False
    )
    assert first["teacher_cache"] == {"hits": 0, "misses": 4} and second["teacher_cache"] == {"hits": 4, "misses": 0}
    assert run_losses(tmp_path / "a") == run_losses(tmp_path / "b") == run_losses(tmp_path / "live")
    with pytest.raises(GptlabError, match="written for other batches"):
        distill(
            distill_cfg(char_data, tmp_path / "c", teacher_run, teacher_cache=str(tmp_path / "cache"), seed=7, **kw),
            progress=False,
        )


def test_on_policy_steps_are_deterministic(char_data, teacher_run, tmp_path):
    kw = dict(on_policy=0.5, max_iters=6, kd_loss="jsd", jsd_beta=0.5)
    distill(distill_cfg(char_data, tmp_path / "a", teacher_run, **kw), progress=False)
    distill(distill_cfg(char_data, tmp_path / "b", teacher_run, **kw), progress=False)
    rows = read_rows(tmp_path / "a" / "metrics.jsonl")
    ce = [r["ce_loss"] for r in rows if "ce_loss" in r]
    assert 0.0 in ce and any(v > 0 for v in ce)  # on-policy steps have no next-token loss; the others do
    assert run_losses(tmp_path / "a") == run_losses(tmp_path / "b")


def test_bad_pairs_are_one_line_errors(char_data, teacher_run, tmp_path):
    bad = run_cli(
        "distill",
        "--data",
        str(char_data),
        "--teacher",
        str(teacher_run),
        "--kd-loss",
        "reverse_kl",
        "--teacher-top-k",
        "8",
        "--out-dir",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and bad.stderr.startswith("gptlab: error:") and "forward_kl" in bad.stderr
    wide = run_cli(
        "distill",
        "--data",
        str(char_data),
        "--teacher",
        str(teacher_run),
        "--model",
        "baby",
        "--block-size",
        "32",
        "--hidden-weight",
        "1",
        "--out-dir",
        str(tmp_path / "y"),
    )
    assert wide.returncode == 2 and "equal widths" in wide.stderr and len(wide.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, teacher_run):
    from gptlab.data.prepare import prepare

    (tmp_path / "t.txt").write_text("hello world, hello there. " * 400)
    prepare([str(tmp_path / "t.txt")], tmp_path / "gpt2", tokenizer="gpt2", progress=False)
    with pytest.raises(GptlabError, match="different tokenizers"):
        distill(distill_cfg(tmp_path / "gpt2", tmp_path / "s", teacher_run), progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_distillation(char_data, teacher_run, tmp_path):
    def cmd(out, *extra):
        return [
            *(sys.executable, "-m", "gptlab", "distill", "--data", str(char_data), "--teacher", str(teacher_run)),
            *("--model", "tiny", "--block-size", "32", "--batch-size", "8", "--max-iters", "120"),
            *("--log-interval", "1", "--eval-interval", "20", "--eval-iters", "2", "--checkpoint-interval", "20"),
            *("--threads", "1", "--device", "cpu", "--final-eval-tokens", "4000", "--kd-loss", "jsd"),
            *("--out-dir", str(out), "--json", *extra),
        ]

    full = subprocess.run(cmd(tmp_path / "full"), env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    kill_once_written(cmd(tmp_path / "killed"), tmp_path / "killed" / "checkpoints" / "step-0000040" / "state.json")
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_losses(tmp_path / "killed") == run_losses(tmp_path / "full")
    a = checkpoint.load_checkpoint(tmp_path / "full")[0].state_dict()
    b = checkpoint.load_checkpoint(tmp_path / "killed")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
