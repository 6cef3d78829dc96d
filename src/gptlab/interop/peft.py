"""LoRA adapters in Hugging Face PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways,
and the one reader of an adapter from a PEFT folder or a gptlab LoRA run (:mod:`gptlab.lora` has the adapters).

Names follow gptlab's Hugging Face export of the base (:mod:`.hf`): Llama-family models have one module per role
(``q_proj`` ... ``down_proj``); GPT-2 and GPT-1 keep q/k/v in one ``c_attn`` Conv1D (``fan_in_fan_out``), where
gptlab's separate q/k/v adapters are written as one adapter of the summed rank whose B is block-diagonal (exact,
with ``rank_pattern`` and ``alpha_pattern`` keeping alpha / r), and read back as q, k and v sharing that A.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import load_weights, read_safetensors, read_state, resolve
from ..config import GPTConfig
from ..errors import GptlabError
from ..files import atomic_dir, honour_umask
from ..lora import Weights, _weight_of, adapters, attach, check_record, role_rows
from ..model import GPT

HF_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
HF_GPT2 = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc",
           "down": "mlp.c_proj"}  # fmt: skip


def _hf_layers(cfg: GPTConfig) -> tuple[str, dict[str, str]]:
    """(prefix of block i's modules in the HF model, role -> module under it)."""
    if cfg.positions == "rope":
        return "model.layers.{i}.", HF_LLAMA
    return "transformer.h.{i}.", HF_GPT2


def to_peft(model: GPT, base: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_model.safetensors tensors, adapter_config.json) of ``model``'s adapters, named for the Hugging Face
    export of its base (:mod:`gptlab.interop.hf`)."""
    cfg = model.config
    rec = check_record(getattr(model, "lora", None))
    prefix, hf = _hf_layers(cfg)
    rows = role_rows(cfg)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for i, block in enumerate(model.h):
        by_module: dict[str, list[str]] = {}
        for role in rec["roles"]:
            by_module.setdefault(hf[role], []).append(role)
        for module, roles in by_module.items():
            layer = block.get_submodule(rows[roles[0]][0])
            lora: Any = layer._modules.get("lora")
            if lora is None:
                continue  # an MoE layer
            name = "base_model.model." + prefix.format(i=i) + module
            if len(roles) == 1 or cfg.positions == "rope":  # one HF module per role
                (r,) = roles if len(roles) == 1 else (None,)
                assert r is not None
                tensors[f"{name}.lora_A.weight"] = lora.A[r].detach().float().cpu().contiguous()
                tensors[f"{name}.lora_B.weight"] = lora.B[r].detach().float().cpu().contiguous()
                ranks[module], alphas[module] = rec["roles"][r][0], rec["roles"][r][1]
                continue
            # GPT-2's c_attn: the roles' adapters side by side, B block-diagonal over the roles' rows, alpha / r kept
            scale = {lora.scales[r] for r in roles}
            if len(scale) > 1:
                raise GptlabError("q, k and v adapters of different alpha / rank cannot share GPT-2's c_attn in PEFT")
            A = torch.cat([lora.A[r].detach().float() for r in roles])
            B = torch.zeros(_weight_of(layer)[0], A.size(0))
            col = 0
            for r in roles:
                a, b = rows[r][1], rows[r][2]
                rank = lora.A[r].size(0)
                B[a:b, col : col + rank] = lora.B[r].detach().float().cpu()
                col += rank
            tensors[f"{name}.lora_A.weight"] = A.cpu().contiguous()
            tensors[f"{name}.lora_B.weight"] = B.contiguous()
            ranks[module], alphas[module] = A.size(0), scale.pop() * A.size(0)
    modules = sorted(set(ranks))
    r0, a0 = ranks[modules[0]], alphas[modules[0]]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": rec.get("dropout", 0.0),
        "target_modules": modules,
        "rank_pattern": {m: ranks[m] for m in modules if ranks[m] != r0},
        "alpha_pattern": {m: alphas[m] for m in modules if alphas[m] != a0},
        "fan_in_fan_out": cfg.positions != "rope",  # GPT-2's Conv1D stores [in, out]
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return tensors, config


def save_peft(model: GPT, out: Path, base: str = "", replace: bool = False) -> Path:
    """Write ``model``'s adapters as a PEFT folder, atomically; an existing folder is replaced only if ``replace``
    (a run's own ``adapter/``)."""
    tensors, config = to_peft(model, base)
    with atomic_dir(Path(out), replace=replace) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        honour_umask(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_peft(path: Path, cfg: GPTConfig) -> tuple[dict[str, Any], Weights]:
    """The adapter in PEFT folder ``path`` for a model of ``cfg``: its record (:func:`record`'s form) and its
    tensors per block and role. Wrong shapes, unknown modules or options gptlab does not implement (DoRA, rsLoRA,
    bias training, extra saved modules) are one clear error."""
    path = Path(path)
    try:
        conf = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GptlabError(f"{path}/adapter_config.json is missing or not JSON; give a PEFT LoRA folder") from None
    unsupported = [
        k
        for k, bad in (
            ("peft_type", conf.get("peft_type") != "LORA"),
            ("use_dora", bool(conf.get("use_dora"))),
            ("use_rslora", bool(conf.get("use_rslora"))),
            ("bias", conf.get("bias", "none") != "none"),
            ("modules_to_save", bool(conf.get("modules_to_save"))),
        )
        if bad
    ]
    if unsupported:
        raise GptlabError(f"{path}: the adapter uses {', '.join(unsupported)}, which gptlab does not load (plain LoRA)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise GptlabError(f"{weights} is missing; save the adapter with safetensors (PEFT's default)")
    sd = read_safetensors(weights)
    prefix, hf = _hf_layers(cfg)
    rows = role_rows(cfg)
    r0, a0 = conf.get("r", 8), conf.get("lora_alpha", 8)
    pattern = lambda table, module, default: next(
        (v for k, v in (table or {}).items() if module == k or module.endswith("." + k)), default
    )
    found: dict[str, dict[str, torch.Tensor]] = {}  # module path -> {lora_A, lora_B}
    for key, t in sd.items():
        head = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if f".{part}." in head:
                found.setdefault(head.split(f".{part}.")[0], {})[part] = t
    layer_of = {prefix.format(i=i) + m: (i, m) for i in range(cfg.n_layer) for m in set(hf.values())}
    roles_of_module: dict[str, list[str]] = {}
    for role, m in hf.items():
        if role in rows:
            roles_of_module.setdefault(m, []).append(role)
    per_block: Weights = {}
    ranks: dict[str, list[float]] = {}
    for module_path, ab in found.items():
        if (
            module_path not in layer_of
            or set(ab) != {"lora_A", "lora_B"}
            or layer_of[module_path][1] not in (roles_of_module)
        ):
            raise GptlabError(f"{weights}: {module_path!r} is not a projection of this model's blocks")
        i, m = layer_of[module_path]
        r = int(pattern(conf.get("rank_pattern"), m, r0))
        alpha = float(pattern(conf.get("alpha_pattern"), m, a0))
        A, B = ab["lora_A"].float(), ab["lora_B"].float()
        roles = roles_of_module[m]
        start, want_rows = rows[roles[0]][1], rows[roles[-1]][2] - rows[roles[0]][1]
        want_in = _in_features(cfg, rows[roles[0]][0])
        if A.shape != (r, want_in) or B.shape != (want_rows, r):
            raise GptlabError(
                f"{weights}: {module_path} has A {tuple(A.shape)} and B {tuple(B.shape)}; this model needs "
                f"{(r, want_in)} and {(want_rows, r)} (rank {r} from adapter_config.json): the adapter belongs to "
                f"another base"
            )
        for role in roles:  # GPT-2's c_attn: every role's rows of B, the same A
            a, b = rows[role][1] - start, rows[role][2] - start
            per_block.setdefault(i, {})[role] = (A, B[a:b])
            ranks[role] = [r, alpha]
    if not per_block:
        raise GptlabError(f"{weights} holds no LoRA tensors")
    first = set(per_block[next(iter(per_block))])
    if any(set(v) != first for v in per_block.values()) or len(per_block) != cfg.n_layer:
        raise GptlabError(f"{weights}: gptlab loads adapters on the same projections of every block")
    return {"roles": {k: ranks[k] for k in first}, "dropout": float(conf.get("lora_dropout", 0.0))}, per_block


def _in_features(cfg: GPTConfig, layer: str) -> int:
    return (
        cfg.n_head * cfg.head_dim
        if layer == "attn.c_proj"
        else cfg.ffn_hidden
        if layer == "mlp.c_proj"
        else (cfg.n_embd)
    )


def read_adapter(source: str | Path, cfg: GPTConfig) -> tuple[dict[str, Any], Weights]:
    """The adapter of a PEFT folder or of a gptlab LoRA run, for a model of ``cfg`` (checked against it)."""
    if is_peft_dir(Path(source)):
        return read_peft(Path(source), cfg)
    ckpt = resolve(source)
    state = read_state(ckpt)
    if not state.get("lora"):
        raise GptlabError(f"{source} is neither a PEFT adapter folder nor a gptlab LoRA run")
    if state["model_config"] != cfg.to_dict():
        raise GptlabError(f"{source} adapts another model than this one (their model configs differ)")
    rec = check_record(state["lora"])
    weights: Weights = {}
    sd = load_weights(ckpt, state)
    rows = role_rows(cfg)
    for i in range(cfg.n_layer):
        for role in rec["roles"]:
            key = f"h.{i}.{rows[role][0]}.lora"
            if f"{key}.A.{role}" in sd:
                weights.setdefault(i, {})[role] = (sd[f"{key}.A.{role}"].float(), sd[f"{key}.B.{role}"].float())
    return rec, weights


def load_adapter(source: str | Path, model: GPT) -> GPT:
    """Attach the adapter of ``source`` (a PEFT folder or a gptlab LoRA run) to ``model`` (a GPT without adapters)
    and load its weights."""
    cfg = model.config
    if adapters(model):
        raise GptlabError("the model already carries adapters; give the base model")
    rec, weights = read_adapter(source, cfg)
    attach(model, cfg, rec)
    rows = role_rows(cfg)
    with torch.no_grad():
        for i, block in enumerate(model.h):
            for role, (A, B) in weights.get(i, {}).items():
                lora: Any = block.get_submodule(rows[role][0]).lora
                lora.A[role].copy_(A)
                lora.B[role].copy_(B)
    return model
