"""Building blocks the transformer uses but that are not the transformer: the fused head-and-loss and a
compile-aware ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-1 = ignored), computed chunk by chunk so the
    [N, vocab] logits never exist at once, with both gradients formed in the same pass (softmax minus one-hot) and
    handed to autograd in backward. Exact, not an approximation: tests compare it with ``F.cross_entropy``. It saves
    the memory of the full logits and, on CPU, 30 % of the head-and-loss time of GPT-2 (no log_softmax round trip)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int):
        # Under autocast the three matmuls run in the autocast dtype (bf16 on GPU: tensor cores), chosen here
        # explicitly: autocast does not apply to in-place ops, so an fp32 `addmm_` into the fp32 weight gradient
        # would silently run the largest matmul of the step at fp32 speed. The softmax and both gradients
        # accumulate in fp32 at least.
        device = x.device.type
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        count = (targets >= 0).sum().clamp(min=1)
        grad_x = torch.empty(x.shape, device=x.device, dtype=acc)
        grad_w = torch.zeros(weight.shape, device=x.device, dtype=torch.promote_types(weight.dtype, acc))
        total = torch.zeros((), device=x.device, dtype=acc)
        with torch.autocast(device, enabled=False):
            x_mm, w_mm = x.to(mm), weight.to(mm)
            for s in range(0, x.size(0), chunk_rows):
                xc, t = x_mm[s : s + chunk_rows], targets[s : s + chunk_rows]
                logits = F.linear(xc, w_mm).to(acc)
                logits[:, vocab_size:] = float("-inf")  # vocabulary padding, if any
                lse = torch.logsumexp(logits, dim=1)
                valid = t >= 0
                t = t.clamp(min=0)
                total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                probs *= valid[:, None]
                probs_mm = probs.to(mm)
                grad_x[s : s + chunk_rows] = probs_mm @ w_mm
                if mm == grad_w.dtype:
                    grad_w.addmm_(probs_mm.t(), xc)
                else:
                    grad_w += probs_mm.t() @ xc  # a low-precision product, accumulated in fp32
        ctx.save_for_backward((grad_x / count).to(x.dtype), (grad_w / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


class Linear(nn.Linear):
    """``nn.Linear``, except that inside ``torch.compile`` a product with a single row (decoding one token) is
    written as multiply-and-sum, which inductor fuses into one vectorized, bandwidth-bound loop over the weight.
    On a 2-core AVX-512 CPU that streams GPT-2's matrices at ~34 GB/s where MKL's sgemv reaches ~10 GB/s
    (docs/generation.md). Same weights, same state dict; eager mode and training use the ordinary matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        return super().forward(x)
