"""Low-rank adaptation (LoRA, Hu et al. 2021) of a GPT's projections, QLoRA's frozen quantized base (Dettmers et
al. 2023), Hugging Face PEFT's adapter format, merging, and a bank of adapters served together.

A layer with an adapter computes ``y = W x + Σ_s scale_s · B_s A_s dropout(x)`` on the row slices ``s`` of its
output: gptlab stacks q, k and v in one ``c_attn`` and SwiGLU's gate and up in one ``c_fc``, so an adapter on
``q`` and ``v`` is two (A, B) pairs on two row ranges of ``c_attn``. ``A_s`` [r, in] starts Kaiming-uniform and
``B_s`` [rows, r] at zero (the update starts at 0), ``scale_s = alpha / r``: PEFT's definitions, so that
:func:`merge` folds exactly ``W[rows] += (alpha / r) · B A``.

Targets are the projections' roles, the same names for every block gptlab builds: ``q k v o`` (attention) and
``gate up down`` (MLP; a GELU or ReLU² MLP has ``up`` and ``down`` only), or ``all``. MoE layers keep their
experts frozen and unadapted. The adapter lives as the ``lora`` child of the layer it adapts, so the base's tensor
names do not change (``h.0.attn.c_attn.weight`` beside ``h.0.attn.c_attn.lora.A.q``), and a model's ``lora``
record (:func:`record`) rebuilds the same modules when a checkpoint is loaded.

PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by ``peft`` on top of gptlab's
Hugging Face export): Llama-family models have one module per role (``q_proj`` ... ``down_proj``); GPT-2 and GPT-1
keep q/k/v in one ``c_attn`` Conv1D, where gptlab's separate q/k/v adapters are written as one adapter of the
summed rank whose B is block-diagonal (exact, with ``rank_pattern`` and ``alpha_pattern`` keeping alpha / r).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn

from .config import GPTConfig
from .errors import GptlabError

if TYPE_CHECKING:
    from .model import GPT

LAYERS = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
          "gate": "mlp.c_fc", "up": "mlp.c_fc", "down": "mlp.c_proj"}  # fmt: skip


def role_rows(cfg: GPTConfig) -> dict[str, tuple[str, int, int]]:
    """Every role of a block of ``cfg``: (the layer under the block, first row, end row) of its output."""
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden
    out = {
        "q": (LAYERS["q"], 0, q),
        "k": (LAYERS["k"], q, q + kv),
        "v": (LAYERS["v"], q + kv, q + 2 * kv),
        "o": (LAYERS["o"], 0, cfg.n_embd),
        "up": (LAYERS["up"], 0, hidden),
        "down": (LAYERS["down"], 0, cfg.n_embd),
    }
    if cfg.mlp == "swiglu":
        out["gate"], out["up"] = (LAYERS["gate"], 0, hidden), (LAYERS["up"], hidden, 2 * hidden)
    return out


def parse_targets(text: str, cfg: GPTConfig) -> list[str]:
    """``"q,v"`` or ``"all"`` -> the roles, checked against the model's block."""
    have = role_rows(cfg)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(have)
    bad = [t for t in names if t not in have]
    if bad or not names:
        raise GptlabError(
            f"--lora-targets {text!r}: {'unknown role ' + repr(bad[0]) if bad else 'empty'}; this model's roles are "
            f"{', '.join(have)} (or all)"
        )
    return list(dict.fromkeys(names))


class LoRA(nn.Module):
    """The adapters of one linear layer: per row slice ``s``, ``scale_s · B_s A_s dropout(x)`` (see the module
    docstring). ``enabled = False`` turns them off (the base model: a LoRA run's reference, PEFT's
    ``disable_adapter``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        slices: dict[str, tuple[int, int]],
        ranks: dict[str, int],
        alphas: dict[str, float],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_features, self.slices = out_features, dict(sorted(slices.items(), key=lambda kv: kv[1]))
        self.A = nn.ParameterDict({s: nn.Parameter(torch.empty(ranks[s], in_features)) for s in self.slices})
        self.B = nn.ParameterDict({s: nn.Parameter(torch.zeros(b - a, ranks[s])) for s, (a, b) in self.slices.items()})
        self.scales = {s: alphas[s] / ranks[s] for s in self.slices}
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for s in self.slices:  # PEFT's init: A as nn.Linear's default (Kaiming-uniform, a = sqrt 5), B = 0
            nn.init.kaiming_uniform_(self.A[s], a=math.sqrt(5))
            nn.init.zeros_(self.B[s])

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (the layer's output for ``x``) with each slice's update added in place."""
        x = self.dropout(x)
        for s, (a, b) in self.slices.items():
            A, B = self.A[s], self.B[s]
            y[..., a:b] += (x.to(A.dtype) @ A.t() @ B.t() * self.scales[s]).to(y.dtype)
        return y

    def delta(self) -> torch.Tensor:
        """The update as a weight, [out_features, in_features] (fp32): what :func:`merge` adds."""
        A0 = next(iter(self.A.values()))
        d = torch.zeros(self.out_features, A0.size(1), device=A0.device)
        for s, (a, b) in self.slices.items():
            d[a:b] += self.scales[s] * (self.B[s].float() @ self.A[s].float())
        return d


Weights = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # block -> role -> (A [r, in], B [rows, r])


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """Every adapter of ``model``, by the name of the layer it adapts."""
    return {n.removesuffix(".lora"): m for n, m in model.named_modules() if isinstance(m, LoRA)}


def attach(model: GPT, cfg: GPTConfig, rec: dict[str, Any]) -> GPT:
    """Give ``model`` (a GPT) the adapters of ``rec`` (:func:`record`), freshly initialised, on its device; every
    other parameter is frozen. Returns the model."""
    rows = role_rows(cfg)
    roles = rec["roles"]
    bad = [r for r in roles if r not in rows]
    if bad:
        raise GptlabError(f"the adapter targets {bad[0]!r}, which this model's blocks do not have ({', '.join(rows)})")
    model.requires_grad_(False)
    done = 0
    for block in model.h:
        for layer, rs in _layers(block, rows, roles):
            w = _weight_of(layer)
            lora = LoRA(
                w[1],
                w[0],
                {r: rows[r][1:] for r in rs},
                {r: int(roles[r][0]) for r in rs},
                {r: float(roles[r][1]) for r in rs},
                rec.get("dropout", 0.0),
            ).to(w[2])
            layer.add_module("lora", lora)
            done += 1
    if not done:
        raise GptlabError("no layer of this model takes the adapters (every targeted MLP is a mixture of experts)")
    model.lora = dict(rec)  # type: ignore[assignment]
    return model


def _layers(block: nn.Module, rows: dict[str, tuple[str, int, int]], roles: Any) -> list[tuple[nn.Module, list[str]]]:
    """The layers of ``block`` that ``roles`` adapt, each with its roles (an MoE layer's experts are left out)."""
    by_layer: dict[str, list[str]] = {}
    for role in roles:
        if role not in by_layer.setdefault(rows[role][0], []):
            by_layer[rows[role][0]].append(role)
    moe = not hasattr(block.mlp, "c_fc")
    return [(block.get_submodule(n), rs) for n, rs in by_layer.items() if not (moe and n.startswith("mlp."))]


def _weight_of(layer: nn.Module) -> tuple[int, int, torch.device]:
    """(out, in, device) of a float or quantized linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, layer.weight.device
    return layer.out_features, layer.in_features, layer.qweight.device  # type: ignore[return-value]


def record(targets: list[str], rank: int, alpha: float, dropout: float) -> dict[str, Any]:
    """A model's (and a checkpoint's) description of its adapters: per role [rank, alpha], and the dropout."""
    return {"roles": {t: [rank, alpha] for t in targets}, "dropout": dropout}


def check_record(rec: Any) -> dict[str, Any]:
    ok = isinstance(rec, dict) and isinstance(rec.get("roles"), dict) and rec["roles"]
    ok = ok and all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and v[0] > 0 and isinstance(v[1], (int, float))
        for v in rec["roles"].values()
    )
    if not ok:
        raise GptlabError(f"the checkpoint's lora record {str(rec)[:120]} is damaged; use another checkpoint")
    return rec


def add_lora(model: GPT, targets: str, rank: int, alpha: float, dropout: float) -> GPT:
    """LoRA fine-tuning: adapters of ``rank`` on ``targets`` (``"q,v"``, ``"all"``), the rest frozen."""
    if getattr(model, "lora", None):
        raise GptlabError("the model already carries adapters; merge them first (gptlab convert MODEL --merge-lora)")
    cfg = model.config
    return attach(model, cfg, record(parse_targets(targets, cfg), rank, alpha, dropout))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The base model: every adapter off inside the block."""
    loras = list(adapters(model).values())
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True


class BaseModel(nn.Module):
    """A LoRA model seen without its adapters (the frozen reference of DPO, PPO and GRPO, at no memory cost):
    calls run the model with adapters off and without gradients. Not a submodule of anything: it holds the model by
    reference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        model: Any = self._model[0]
        with disabled(model), torch.no_grad():
            return model(*args, **kwargs)


def merge(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight (``W += scale · B A``, in fp32) and remove it. A quantized base
    cannot take the update: load the float base and merge there."""
    for name, lora in adapters(model).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise GptlabError(
                f"{name} is quantized; merge the adapter into the float model (gptlab convert BASE --lora ADAPTER)"
            )
        with torch.no_grad():
            layer.weight.copy_((layer.weight.float() + lora.delta()).to(layer.weight.dtype))
        del layer._modules["lora"]
    if hasattr(model, "lora"):
        del model.lora
    return model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Parameters that take gradients, and all parameters (each shared tensor once; a quantized layer's weights,
    held as codes, counted as the weights they stand for)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    quantized = sum(
        int(m.in_features) * int(m.out_features) + (m.bias.numel() if m.bias is not None else 0)
        for m in cast(Any, model.modules())
        if hasattr(m, "qweight")
    )
    return {
        "trainable_params": sum(p.numel() for p in seen.values() if p.requires_grad),
        "params": sum(p.numel() for p in seen.values()) + quantized,
    }


class LoRABank(nn.Module):
    """Several adapters of one layer served together (Punica / S-LoRA's batched LoRA): adapter 0 is none (the
    base), and each row of a forward pass uses the adapter :func:`use_adapters` gave it, by gathering that row's A
    and B and multiplying batch-wise. Ranks are padded to the largest with zeros and roles an adapter lacks are
    zero: rows compute exactly their own adapter's update."""

    def __init__(self, out_features: int, slices: dict[str, tuple[int, int]], stacks: dict[str, tuple[torch.Tensor,
                 torch.Tensor]]) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.slices = out_features, dict(sorted(slices.items(), key=lambda kv: kv[1]))
        for s, (A, B) in stacks.items():  # A [n + 1, r, in], B [n + 1, rows, r] with the scale folded in
            self.register_buffer(f"A_{s}", A)
            self.register_buffer(f"B_{s}", B)
        self.enabled = True
        self.ids: torch.Tensor | None = None

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (the layer's output for ``x`` [B, ..., in]) with each row's adapter's update added in place."""
        ids = self.ids
        if ids is None or ids.numel() != x.size(0):
            raise RuntimeError("a LoRA bank needs one adapter id per row of the batch (use_adapters)")
        flat = x.reshape(x.size(0), -1, x.size(-1))
        for s, (a, b) in self.slices.items():
            A, B = getattr(self, f"A_{s}")[ids], getattr(self, f"B_{s}")[ids]
            d = torch.bmm(torch.bmm(flat.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2))
            y[..., a:b] += d.reshape(*y.shape[:-1], b - a).to(y.dtype)
        return y


def attach_bank(model: GPT, loaded: list[tuple[dict[str, Any], Weights]]) -> None:
    """Serve the adapters ``loaded`` (each a record and its weights, :func:`gptlab.interop.peft.read_adapter`)
    beside the base: every adapted layer of ``model`` gets a :class:`LoRABank`; adapter ``k + 1`` is
    ``loaded[k]``."""
    if adapters(model):
        raise GptlabError("the served model carries LoRA adapters; serve its base with --lora, or merge them")
    rows = role_rows(model.config)
    device = next(model.parameters()).device
    every_role = [role for rec, _ in loaded for role in rec["roles"]]
    for i, block in enumerate(model.h):
        for layer, roles in _layers(block, rows, every_role):
            out_f, in_f, _ = _weight_of(layer)
            stacks = {}
            for role in roles:
                a, b = rows[role][1:]
                r_max = max((w[i][role][0].size(0) for _, w in loaded if role in w.get(i, {})), default=1)
                A = torch.zeros(len(loaded) + 1, r_max, in_f)
                B = torch.zeros(len(loaded) + 1, b - a, r_max)
                for k, (rec, w) in enumerate(loaded, start=1):
                    if role in w.get(i, {}):
                        Ak, Bk = w[i][role]
                        rank, alpha = rec["roles"][role]
                        A[k, : Ak.size(0)] = Ak
                        B[k, :, : Bk.size(1)] = Bk * (alpha / rank)
                stacks[role] = (A.to(device), B.to(device))
            layer.add_module("lora", LoRABank(out_f, {r: rows[r][1:] for r in roles}, stacks))


def use_adapters(model: nn.Module, ids: torch.Tensor) -> None:
    """Which adapter each row of the next forward passes uses (0: the base), for every :class:`LoRABank`."""
    for m in model.modules():
        if isinstance(m, LoRABank):
            m.ids = ids


def merged_adapters(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state dict with the model's LoRA adapters (if any) folded into their layers' weights and their own
    tensors dropped: the form Hugging Face folders and GGUF files take."""
    found = adapters(model)
    if not found:
        return sd
    print("gptlab: note: the LoRA adapters are merged into the weights", file=sys.stderr)
    out = {k: v for k, v in sd.items() if ".lora." not in k}
    for name, lora in found.items():
        out[f"{name}.weight"] = out[f"{name}.weight"] + lora.delta().cpu()
    return out
