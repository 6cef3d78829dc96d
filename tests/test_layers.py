"""The training kernels of gptlab.layers (the fused head-and-loss's softmax, GELU's tanh form) against float64
PyTorch computations of the same functions."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels, layers
from gptlab.layers import LinearCrossEntropy


def needs_kernels() -> None:
    if not kernels.have_kernels():
        pytest.skip("gptlab's CPU kernels are not available here (no AVX2, no compiler, or GPTLAB_KERNELS=off)")


def reference_softmax(logits, targets, vocab_size, scale):
    """float64: the losses of the columns of ``logits`` [V, R] and (softmax - one-hot) * scale."""
    z = logits.double().clone()
    z[vocab_size:] = float("-inf")
    lse = torch.logsumexp(z, 0)
    valid, t = targets >= 0, targets.clamp(min=0)
    cols = torch.arange(len(t))
    losses = (lse - z[t, cols]) * valid
    grad = (z - lse).exp()
    grad[t, cols] -= 1
    return losses, grad * scale.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(101, 97, 48), (50, 50, 37), (1000, 990, 64), (3, 3, 5), (300, 257, 1029)])
def test_the_softmax_kernel_equals_float64(dtype, shape):
    """Vocabulary padding, ignored targets, columns in whole vectors and a scalar tail, more vocabulary rows than
    threads' shares: losses within fp32 rounding, the gradient to the precision of its dtype."""
    needs_kernels()
    V, vocab, R = shape
    torch.manual_seed(V + R)
    logits = (torch.randn(V, R) * 4).to(dtype)
    targets = torch.randint(0, vocab, (R,))
    targets[::7] = -1
    scale = (targets >= 0).float() / (targets >= 0).sum()
    ref_losses, ref_grad = reference_softmax(logits, targets, vocab, scale)
    got = logits.clone()
    losses = kernels.softmax_xent_(got, targets, vocab, scale)
    assert losses is not None and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), ref_losses, rtol=2e-6, atol=2e-6)
    tol = {"rtol": 5e-6, "atol": 2e-7} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-12}
    torch.testing.assert_close(got.double(), ref_grad, **tol)
    assert (got[vocab:] == 0).all()  # padding rows: no gradient


@pytest.mark.slow
def test_the_softmax_kernels_8_lane_loop_also_runs_under_test_on_wider_cpus():
    """An AVX-512 CPU takes the 16-lane loops; a build with GPTLAB_KERNELS=avx2 takes the 8-lane ones that AVX2 CPUs
    run: the same checks in a process of its own, and the same bits as this process's loops."""
    needs_kernels()
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "avx512bw" not in flags or os.environ.get("GPTLAB_KERNELS") == "avx2":
        pytest.skip("this CPU's own loop is the 8-lane one, tested above")
    torch.manual_seed(0)
    logits, targets = (torch.randn(300, 1029) * 4).to(torch.bfloat16), torch.randint(0, 257, (1029,))
    scale = torch.full((1029,), 1 / 1029)
    code = (  # (the same threads: each thread's share of the vocabulary is summed on its own, then merged)
        "import sys, torch; from gptlab import kernels; torch.set_num_threads(int(sys.argv[2])); "
        "l, t, s = torch.load(sys.argv[1]); loss = kernels.softmax_xent_(l, t, 257, s); "
        "torch.save((l, loss), sys.argv[1])"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.pt"
        torch.save((logits.clone(), targets, scale), path)
        env = {**os.environ, "GPTLAB_KERNELS": "avx2"}
        threads = str(torch.get_num_threads())
        done = subprocess.run([sys.executable, "-c", code, str(path), threads], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        narrow = torch.load(path)
    test = "tests/test_layers.py::test_the_softmax_kernel_equals_float64"
    checks = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                            capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert checks.returncode == 0 and "10 passed" in checks.stdout, checks.stdout[-3000:]
    loss = kernels.softmax_xent_(logits, targets, 257, scale)
    assert torch.equal(logits, narrow[0]) and torch.equal(loss, narrow[1])


def test_the_softmax_kernel_flags_non_finite_logits_and_refuses_bad_targets():
    needs_kernels()
    logits = torch.randn(40, 9)
    logits[3, 2], logits[5, 4] = float("nan"), float("inf")
    losses = kernels.softmax_xent_(logits, torch.zeros(9, dtype=torch.long), 40, torch.ones(9))
    assert losses is not None
    assert losses[[2, 4]].isnan().all() and losses[[0, 1, 3, 5, 6, 7, 8]].isfinite().all()
    with pytest.raises(RuntimeError, match="targets must be < vocab_size"):
        kernels.softmax_xent_(torch.randn(40, 9), torch.full((9,), 38), 38, torch.ones(9))
    zeros = torch.zeros(9, dtype=torch.long)
    assert kernels.softmax_xent_(torch.randn(40, 9).double(), zeros, 40, torch.ones(9)) is None  # PyTorch's ops


@pytest.mark.parametrize("vocab_slice", [7, 4096])
def test_the_fused_loss_in_float32_equals_cross_entropy(vocab_slice, monkeypatch):
    """fp32, the kernel's path where it runs (PyTorch's ops elsewhere): loss and both gradients against
    F.cross_entropy in float64 on the same inputs, with ignored targets, padding and several chunks."""
    monkeypatch.setattr(layers, "VOCAB_SLICE", vocab_slice)
    torch.manual_seed(5)
    x = torch.randn(45, 24, requires_grad=True)
    w = torch.randn(70, 24, requires_grad=True)  # 61 real ids + 9 padding rows
    t = torch.randint(0, 61, (45,))
    t[[1, 17, 40]] = -1
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(xd @ wd[:61].t(), t, ignore_index=-1)
    for chunk, scale in ((8, 2.0), (45, 2.0), (8, 1.0)):  # (the loss alone: its gradients are handed on as made)
        rx, rw = torch.autograd.grad(ref * scale, (xd, wd), retain_graph=True)
        loss = LinearCrossEntropy.apply(x, w, t, 61, chunk)
        gx, gw = torch.autograd.grad(loss * scale if scale != 1 else loss, (x, w))
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)
        assert gw[61:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gelu_kernel_equals_float64(dtype):
    """GELU's tanh form and its gradient, forward and backward through :func:`gptlab.layers.gelu` in training (a
    length with a tail past the 16-lane loop), against float64 autograd of F.gelu; inference gets training's
    forward bits."""
    if not kernels.gelu_tanh_applies(torch.ones(1)):
        pytest.skip("the GELU kernel needs AVX-512 and gptlab's kernels")
    torch.manual_seed(0)
    x = (torch.randn(3, 1000003 // 3) * 4).to(dtype).requires_grad_()
    g = torch.randn_like(x)
    y = layers.gelu(x, "tanh")
    assert y.grad_fn is not None and y.grad_fn.name().endswith("TanhGeluBackward")
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    yd = F.gelu(xd, approximate="tanh")
    (gd,) = torch.autograd.grad(yd, xd, g.double())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), yd, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(gx.double(), gd, rtol=2e-5, atol=1e-5)
    else:  # one rounding to bf16 of nearly the float64 value
        torch.testing.assert_close(y.double(), yd, rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(gx.double(), gd, rtol=2**-7, atol=2**-7)
    with torch.no_grad():  # eager inference: the same forward kernel, no graph
        inferred = layers.gelu(x, "tanh")
        assert inferred.grad_fn is None and torch.equal(inferred, y.detach())


def test_the_transposing_kernel_equals_pytorchs_transposed_cast():
    """``transpose_to`` against ``x.t().contiguous().to(dtype)``: both dtypes in and out, whole 16 x 16 tiles and
    ragged edges, rows with a stride of their own."""
    if not kernels.has_avx512_kernels():
        pytest.skip("the transposing kernel needs AVX-512 and gptlab's kernels")
    torch.manual_seed(0)
    for shape in [(1, 1), (16, 16), (17, 33), (100, 5), (768, 1024), (50, 3072)]:
        for din in (torch.float32, torch.bfloat16):
            x = (torch.randn(shape) * 100).to(din)
            for dout in (torch.float32, torch.bfloat16):
                assert torch.equal(torch.ops.gptlab.transpose_to(x, dout), x.t().contiguous().to(dout)), (shape, din)
    x = torch.randn(40, 70)[:, 3:50]  # a row stride of 70
    assert torch.equal(kernels.transpose_to(x, torch.bfloat16), x.t().to(torch.bfloat16))


@pytest.mark.parametrize("split", [None, False])  # as measured here; never
def test_a_linear_layer_under_bf16_autocast_is_autocasts_arithmetic_bit_for_bit(split, monkeypatch):
    """In training under CPU bf16 autocast gptlab's Linear takes :class:`~gptlab.layers.AutocastLinear`, which may
    split products into row halves where that measured faster and gave the same bits; output and the three
    gradients equal ``nn.Linear``'s under autocast, bit for bit, whatever was chosen."""
    if not kernels.has_avx512_kernels():
        pytest.skip("gptlab's Linear takes autocast's own path without AVX-512")
    if split is not None:
        monkeypatch.setattr(layers, "halves_pay", lambda key, whole, s: split)
    torch.manual_seed(0)
    cases = [(96, 48, True, (4, 16)), (48, 96, False, (6, 8)), (64, 64, True, (7,)), (32, 24, True, (2, 3))]
    for i, o, bias, lead in cases:
        ours, theirs = layers.Linear(i, o, bias=bias), torch.nn.Linear(i, o, bias=bias)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(*lead, i, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(*lead, o)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y2 = ours(x), theirs(x2)
        assert y.grad_fn.name() == "AutocastLinearBackward"
        (y.float() * g).sum().backward()
        (y2.float() * g).sum().backward()
        assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(ours.weight.grad, theirs.weight.grad)
        assert not bias or torch.equal(ours.bias.grad, theirs.bias.grad)


def test_a_split_that_changes_the_bits_is_never_taken(monkeypatch):
    """``halves_pay`` takes a split only where it gives the same bits as the whole product, however fast it is."""
    monkeypatch.setattr(layers, "_HALVES_PAY", {})
    a, b = torch.randn(8, 4), torch.randn(4, 6)
    assert not layers.halves_pay(("t", 1), lambda: a @ b, lambda: (a @ b).nextafter(torch.tensor(1e9)))
    assert not layers.halves_pay(("t", 2), lambda: (time.sleep(0.01), a @ b)[1], lambda: (a @ b) + 1e-3)
    assert layers.halves_pay(("t", 3), lambda: (time.sleep(0.01), a @ b)[1], lambda: a @ b)
    assert layers.halves_pay(("t", 3), lambda: a @ b, lambda: a @ b)  # measured once: the verdict stays


def _skip_without_the_attention_kernels() -> None:
    if not kernels.has_causal_attention():
        pytest.skip("gptlab's causal attention needs AVX-512 and oneDNN's packed bf16 GEMM (AMX)")


def _attention_errors(fn, q, k, v, g, gqa=False):
    """Relative errors of ``fn``'s output and three gradients under CPU bf16 autocast against float64 causal SDPA
    (``enable_gqa=gqa``)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*leaves)
    out.float().backward(g)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=gqa)
    ref.backward(g.double())
    got = [out.detach(), *(t.grad for t in leaves)]
    want = [ref.detach(), *(t.grad for t in exact)]
    return out, [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 2, 192)])
@pytest.mark.parametrize("spread", [1.0, 3.0])  # query and key scale: flatter and sharper softmaxes
def test_the_causal_attention_kernels_are_as_exact_as_pytorchs_flash_attention(shape, spread):
    """Training's causal attention under CPU bf16 autocast (gptlab's kernels, where they run) against float64: the
    output and the gradients of q, k and v within 10 % of the error of PyTorch's own flash attention in bf16, which
    rounds the same operands to bf16."""
    B, H, T = shape
    torch.manual_seed(0)
    q, k = (torch.randn(B, H, T, 64) * spread for _ in range(2))
    v, g = torch.randn(B, H, T, 64), torch.randn(B, H, T, 64)
    _skip_without_the_attention_kernels()
    out, ours = _attention_errors(layers.causal_attention, q, k, v, g)
    assert out.grad_fn.name() == "CausalAttentionBackward"
    _, flash = _attention_errors(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v, g)
    assert all(a <= 1.1 * b for a, b in zip(ours, flash, strict=True)), (ours, flash)


def test_grouped_query_attention_takes_the_kernels_as_exactly():
    """Grouped-query attention (6 query heads, 2 key/value heads, as SDPA's ``enable_gqa``) by gptlab's kernels:
    the output and the gradients, those of k and v summed over each group, within 10 % of flash attention's error
    against float64."""
    torch.manual_seed(0)
    q, g = torch.randn(2, 6, 128, 64) * 2, torch.randn(2, 6, 128, 64)
    k, v = torch.randn(2, 2, 128, 64) * 2, torch.randn(2, 2, 128, 64)
    _skip_without_the_attention_kernels()
    out, ours = _attention_errors(layers.causal_attention, q, k, v, g, gqa=True)
    assert out.grad_fn.name() == "CausalAttentionBackward"
    flash_gqa = lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)
    _, flash = _attention_errors(flash_gqa, q, k, v, g, gqa=True)
    assert all(a <= 1.1 * b for a, b in zip(ours, flash, strict=True)), (ours, flash)


def test_the_causal_attention_of_a_sequence_does_not_depend_on_the_batch():
    """A sequence's attention and gradients by gptlab's kernels, alone and as the second of a batch of two: the same
    bits (every head is computed on its own); and shapes the kernels do not take go to PyTorch's SDPA."""
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(2, 4, 128, 64) for _ in range(4))
    _skip_without_the_attention_kernels()
    results = []
    for rows in (slice(0, 2), slice(1, 2)):
        leaves = [t[rows].clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layers.causal_attention(*leaves)
        out.float().backward(g[rows])
        results.append([out[-1], *(t.grad[-1] for t in leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for shape in [(1, 2, 100, 64), (1, 1, 576, 64), (1, 2, 128, 32)]:  # T: not a multiple of 64, too long; D
            assert layers.causal_attention(*(torch.randn(shape, requires_grad=True) for _ in range(3))) is None
