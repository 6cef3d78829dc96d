"""The device paths: what a GPU run relies on, checked here on the CPU where it can be, and on CUDA when there is one.

Two kinds of test:

- CPU checks of the CUDA pitfalls (they run in ``make test``): the fused head+loss does its matmuls in the autocast
  dtype; a training step (dense, MoE with a capacity limit, an alignment stage) performs no host sync, seen as the
  ATen ops that force one (``_local_scalar_dense`` behind ``.item()``, ``nonzero`` behind boolean indexing); bf16
  autocast training keeps fp32 weights in its checkpoints and resumes bit for bit.
- The CUDA subset (``device`` fixture): parity with Hugging Face in fp32 and bf16, cached decoding equal to the full
  forward, bit-exact resume, and a training step under ``torch.cuda.set_sync_debug_mode("error")``. They run on the
  first CUDA device; without one they skip, unless ``GPTLAB_TEST_DEVICE=cpu`` asks for them on the CPU (what
  ``benchmarks/gpu_check.sh --cpu-dry-run`` does, so the device script is exercised end to end without a GPU).
"""

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptlab.checkpoint import list_checkpoints, load_checkpoint, read_safetensors, save_model_checkpoint
from gptlab.config import GPTConfig
from gptlab.data.loader import to_device
from gptlab.model import GPT, KVCache, LinearCrossEntropy
from gptlab.train import distributed
from gptlab.train.trainer import Pretraining, train

from .conftest import gpt2_shaped, hf_pair, losses, tiny_cfg

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2"}


class OpLog(TorchDispatchMode):
    """Every ATen op called inside, with the dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))

    def syncs(self) -> Counter:
        return Counter(name for name, _ in self.calls if name in SYNC_OPS)


@pytest.fixture
def device():
    """The device of the CUDA subset: cuda when present; the CPU only when GPTLAB_TEST_DEVICE=cpu asks."""
    want = os.environ.get("GPTLAB_TEST_DEVICE")
    if want:
        return torch.device(want)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (GPTLAB_TEST_DEVICE=cpu runs this on the CPU)")
    return torch.device("cuda")


# ------------------------------------------------------------------ CPU checks of the CUDA pitfalls


def test_fused_loss_under_bf16_autocast_multiplies_in_bf16_and_matches_the_reference():
    """Under autocast every matmul of the head+loss runs in bf16 (an fp32 in-place addmm_ would run the step's
    largest product at fp32 speed on a GPU), the softmax in fp32; loss and both gradients equal the unfused
    autocast reference within bf16 rounding, with fp32 gradients for fp32 parameters."""
    torch.manual_seed(0)
    x = torch.randn(48, 32, requires_grad=True)
    w = (torch.randn(101, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 97, (48,))
    t[::7] = -1
    log = OpLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        loss = LinearCrossEntropy.apply(x, w, t, 97, 16)
    mm = [d for name, d in log.calls if name in ("mm", "addmm", "bmm", "linear")]
    assert mm and all(set(d) == {torch.bfloat16} for d in mm), mm
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32

    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(x2, w2).float()
    logits = logits.masked_fill(torch.arange(101) >= 97, float("-inf"))
    ref = F.cross_entropy(logits, t, ignore_index=-1)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    for ours, theirs in ((x.grad, x2.grad), (w.grad, w2.grad)):
        err = (ours - theirs).norm() / theirs.norm()
        assert err < 2e-2, err  # bf16 products on both sides, rounded at different points


def _syncs_in_train_step(tmp_path, data, **kw) -> Counter:
    cfg = tiny_cfg(data, tmp_path / "run", max_iters=4, **kw)
    d = distributed.Dist(device=torch.device("cpu"))
    job = Pretraining(cfg, d, resume=False)
    job.train_step(0)  # warm-up (lazy optimizer state)
    with OpLog() as log:
        job.train_step(1)
    return log.syncs()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_experts": 4, "experts_per_token": 2, "capacity_factor": 1.25}],
    ids=["dense", "moe-capacity"],
)
def test_a_training_step_needs_no_host_sync(char_data, tmp_path, overrides):
    """One optimizer step (loader, forward, fused loss, backward, clipping, fused AdamW) calls no ATen op that
    forces a device-to-host sync; with a capacity limit the MoE dispatch is sync-free too."""
    assert _syncs_in_train_step(tmp_path, char_data, grad_accum=2, model_overrides=overrides) == Counter()


def test_dropless_moe_training_syncs_once_per_moe_layer_as_documented(char_data, tmp_path):
    """The dropless buffer is sized by the busiest expert: one count read back per MoE layer per micro-batch (the
    reason docs/moe.md says to train with a capacity factor on a GPU). The detector sees it."""
    syncs = _syncs_in_train_step(tmp_path, char_data, model_overrides={"n_experts": 4, "experts_per_token": 2})
    assert syncs == Counter({"_local_scalar_dense": 2}), syncs  # `tiny` has two layers, every one routed


def test_moe_capacity_drops_the_same_assignments_with_static_shapes():
    """The sync-free capacity path (dropped assignments kept in place with weight 0) gives the output of routing
    only the kept assignments, computed independently with a loop over tokens."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32, n_experts=4, experts_per_token=2)
    cfg = cfg.replace(capacity_factor=0.5)
    torch.manual_seed(0)
    moe = GPT(cfg).h[0].mlp.train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 12, 16)
    out = moe(x)[0]
    probs = moe.router(x[0]).float().softmax(-1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    slots = int(np.ceil(0.5 * 12 * 2 / 4))
    used = Counter()
    ref = torch.zeros(12, 16)
    for k in range(2):  # priority: every token's first choice before any second choice
        for n in range(12):
            ex = int(e[n, k])
            if used[ex] < slots:
                used[ex] += 1
                h = F.gelu(x[0, n] @ moe.fc_weight[ex] + moe.fc_bias[ex], approximate="tanh")
                ref[n] += w[n, k] * (h @ moe.proj_weight[ex] + moe.proj_bias[ex])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert abs(moe.stats["dropped_fraction"].item() - (1 - sum(used.values()) / 24)) < 1e-6


def test_to_device_keeps_cpu_batches_and_pins_for_cuda(device):
    x, y = torch.arange(6).view(2, 3), torch.arange(6, 12).view(2, 3)
    xs, ys = to_device((x, y), device)
    assert xs.device.type == device.type and torch.equal(xs.cpu(), x) and torch.equal(ys.cpu(), y)


def test_bf16_autocast_training_keeps_fp32_checkpoints_and_resumes_bit_for_bit(char_data, tmp_path):
    """Mixed precision keeps fp32 master weights: checkpoints hold fp32 tensors (a bf16 checkpoint would lose the
    small updates the fp32 weights accumulate), and a resumed bf16 run repeats the uninterrupted one exactly."""
    kw = dict(max_iters=6, checkpoint_interval=3, eval_interval=3, dtype="bfloat16")
    train(tiny_cfg(char_data, tmp_path / "straight", **kw), progress=False)
    train(tiny_cfg(char_data, tmp_path / "split", **{**kw, "max_iters": 3}), progress=False)
    train(tiny_cfg(char_data, tmp_path / "split", **kw), resume=True, progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    sd = read_safetensors(list_checkpoints(tmp_path / "straight")[-1] / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.float32}


def test_a_bf16_state_dict_saves_and_loads_exactly(tmp_path):
    """Weights cast to bf16 (for shipping) are stored as bf16 and load back to exactly those values."""
    model = gpt2_shaped()
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_model_checkpoint(tmp_path / "ck", bf16, model.config, {"kind": "gpt2"})
    assert {t.dtype for t in read_safetensors(tmp_path / "ck" / "model.safetensors").values()} == {torch.bfloat16}
    loaded, _ = load_checkpoint(tmp_path / "ck")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, bf16[k].float()), k


# ------------------------------------------------------------------ the CUDA subset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_parity_on_the_device(device, dtype):
    """Logits equal Hugging Face's on the same device: fp32 within 1e-4 (TF32 off), bf16 within 5e-2 of the logit
    scale (both sides round every product to bf16, in different places)."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=500)
    hf, ours = hf_pair(cfg)
    hf, ours = hf.to(device, dtype), ours.to(device, dtype)
    idx = torch.randint(0, cfg.vocab_size, (3, 40), device=device)
    with torch.no_grad():
        ref = hf(idx).logits.float()
        got = ours(idx)[0].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decoding_equals_the_full_forward_on_the_device(device, dtype):
    """Decoding token by token through the KV cache gives the full forward's last-position logits at every step."""
    model = gpt2_shaped(vocab_size=512).to(device, dtype)
    seq = torch.randint(0, 512, (2, 24), device=device)
    cache = KVCache(model.config, 2, 24, device, dtype)
    with torch.no_grad():
        model.decode(seq[:, :8], cache, torch.arange(8, device=device))
        for t in range(8, 24):
            step = model.decode(seq[:, t : t + 1], cache, torch.tensor([t], device=device))[:, -1]
            full = model(seq[:, : t + 1])[0][:, -1]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert (step.float() - full.float()).abs().max().item() <= tol * max(1.0, full.abs().max().item())


def test_resume_on_the_device_is_bit_exact(device, char_data, tmp_path):
    """A resumed run repeats the uninterrupted run's losses exactly, with deterministic kernels
    (torch.use_deterministic_algorithms; CUBLAS_WORKSPACE_CONFIG set by benchmarks/gpu_check.sh)."""
    kw = dict(max_iters=6, checkpoint_interval=3, eval_interval=3, device=str(device), dtype="float32")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train(tiny_cfg(char_data, tmp_path / "straight", **kw), progress=False)
        train(tiny_cfg(char_data, tmp_path / "split", **{**kw, "max_iters": 3}), progress=False)
        train(tiny_cfg(char_data, tmp_path / "split", **kw), resume=True, progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_a_cuda_training_step_never_syncs(device, char_data, tmp_path):
    """On CUDA, torch's own sync detector raises on any synchronizing call inside a bf16 training step (dense and
    MoE with a capacity limit)."""
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode needs CUDA")
    for overrides in ({}, {"n_experts": 4, "experts_per_token": 2, "capacity_factor": 1.25}):
        cfg = tiny_cfg(
            char_data, tmp_path / f"run{len(overrides)}", device="cuda", dtype="bfloat16", model_overrides=overrides
        )
        job = Pretraining(cfg, distributed.Dist(device=device), resume=False)
        job.train_step(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            job.train_step(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
