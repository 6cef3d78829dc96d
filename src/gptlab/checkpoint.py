"""Checkpoints: one folder per step, written atomically, verified on load.

``<run>/checkpoints/step-0000500/`` holds ``model.safetensors`` (weights; a tied head is stored once),
``optimizer.safetensors`` (AdamW moments and step counts, keyed by parameter name, plus the RNG states) and
``state.json`` (step, model and training config, tokenizer spec, best val loss, the sha256 of both tensor files).
The folder is assembled under a temporary name, every file fsynced, then renamed into place, so a crash at any moment
leaves either the whole checkpoint or none. The last ``keep_last`` checkpoints and the best one are kept.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .assets import sha256_of
from .config import GPTConfig
from .errors import GptlabError
from .files import atomic_dir, atomic_write_text, honour_umask, remove_dir
from .model import GPT, drop_tied, with_tied

FORMAT = "gptlab-checkpoint"
VERSION = 1
DCP_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder (gptlab.train.sharded)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:  # its I/O errors carry the OS error number in the text: raise them as OSError
        code = re.search(r"(?:code: |os error )(\d+)", str(e))
        num = int(code.group(1)) if code else errno.EIO
        raise OSError(num, os.strerror(num), str(path)) from None
    honour_umask(path)
    return sha256_of(path)


def save_model_checkpoint(
    out: Path, model_state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer_spec: dict[str, Any], **extra: Any
) -> Path:
    """A weights-only checkpoint folder (no optimizer state: for inference, evaluation or fine-tuning), written
    atomically; refuses to replace an existing folder."""
    with atomic_dir(out, replace=False) as tmp:
        sha = _save_tensors(drop_tied(model_state, cfg), tmp / "model.safetensors")
        meta = dict(
            extra,
            format=FORMAT,
            version=VERSION,
            step=extra.get("step", 0),
            model_config=cfg.to_dict(),
            tokenizer=tokenizer_spec,
            sha256={"model.safetensors": sha},
        )
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    return Path(out)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or one clear error: a truncated file names the first tensor cut off."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"{path} cannot be read: {_diagnose_safetensors(path) or e}") from None


def _diagnose_safetensors(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (OSError, struct.error, ValueError):
        return "not a safetensors file (no readable header)"
    if header is None:
        return f"the file is truncated inside its header ({size} bytes)"
    for name, info in sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][1]
    ):
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            return f"the file is truncated: tensor {name!r} needs bytes up to {end:,}, the file has {size:,}"
    return None


def skeleton(cfg: GPTConfig, quantization: dict[str, Any] | None = None, lora: dict[str, Any] | None = None) -> GPT:
    """The model of a checkpoint on the meta device (no memory): the GPT of ``cfg``, with the quantized layers of
    ``quantization`` (a checkpoint's record, :mod:`gptlab.quant.quantize`) and the LoRA adapters of ``lora``
    (:mod:`gptlab.lora`) in place."""
    with torch.device("meta"):
        model = GPT(cfg)
        if quantization:
            from .quant.quantize import empty_quantized

            empty_quantized(model, quantization)
        if lora:
            from .lora import attach, check_record

            attach(model, cfg, check_record(lora))
    return model


def check_weights(
    sd: dict[str, torch.Tensor],
    cfg: GPTConfig,
    where: str,
    quantization: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
) -> None:
    """Every tensor a model with ``cfg`` (quantized and adapted as recorded) needs is in ``sd`` with the right
    shape and kind (the integer type of quantized codes; any float type for the rest), and nothing else is."""
    expected = skeleton(cfg, quantization, lora).state_dict()
    for name, t in expected.items():
        if name not in sd:
            raise GptlabError(f"{where}: tensor {name!r} is missing")
        if sd[name].shape != t.shape:
            raise GptlabError(
                f"{where}: tensor {name!r} has shape {tuple(sd[name].shape)}, the config needs {tuple(t.shape)}"
            )
        if sd[name].is_floating_point() != t.is_floating_point() or (
            not t.is_floating_point() and sd[name].dtype != t.dtype
        ):
            raise GptlabError(
                f"{where}: tensor {name!r} is {str(sd[name].dtype).removeprefix('torch.')}, the model needs "
                f"{str(t.dtype).removeprefix('torch.') if not t.is_floating_point() else 'a float type'}"
            )
    extra = set(sd) - set(expected)
    if extra:
        raise GptlabError(f"{where}: unexpected tensors {sorted(extra)[:3]}")


def step_dir(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` of run ``run_dir`` lives."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones. ``optim_state`` is a name-keyed optimizer state
    dict (``torch.distributed.checkpoint.state_dict`` layout); ``state`` is JSON-able metadata; ``extra`` tensors
    (task, reward and value heads) go to ``heads.safetensors`` beside the GPT's ``model.safetensors``."""
    final = step_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        cfg = GPTConfig.from_dict(state["model_config"])
        tensors, groups = {}, []
        for name, st in optim_state["state"].items():
            for k, v in st.items():
                tensors[f"state/{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for g in optim_state["param_groups"]:
            groups.append({k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])})
        for k, v in state.pop("rng").items():
            tensors[f"rng/{k}"] = v
        meta = dict(
            state,
            format=FORMAT,
            version=VERSION,
            step=step,
            param_groups=groups,
            sha256={
                "model.safetensors": _save_tensors(drop_tied(model_state, cfg), tmp / "model.safetensors"),
                "optimizer.safetensors": _save_tensors(tensors, tmp / "optimizer.safetensors"),
            },
        )
        if extra:
            meta["sha256"]["heads.safetensors"] = _save_tensors(extra, tmp / "heads.safetensors")
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    prune(run_dir, keep_last, meta.get("best_step"))
    return final


def prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the last ``keep_last`` checkpoints and the best one."""
    keep = {p.name for p in list_checkpoints(run_dir)[-keep_last:]}
    if best_step is not None:
        keep.add(f"step-{best_step:07d}")
    for p in list_checkpoints(run_dir):
        if p.name not in keep:
            remove_dir(p)  # renamed away first: a kill mid-delete never leaves a half checkpoint under its name


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def checkpoints_for(run_dir: Path, resume: bool) -> list[Path]:
    """The run's complete checkpoints, after checking they suit the request: none for a fresh run, some to resume."""
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise GptlabError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run, or choose another --out-dir"
        )
    if resume and not existing:
        raise GptlabError(f"--resume: {run_dir} holds no complete checkpoint to resume from")
    return existing


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), ``<run>/best``, or a checkpoint folder."""
    path = Path(path)
    if path.name == "best" and not path.exists():
        latest = resolve(path.parent)
        best = read_state(latest).get("best_step")
        return latest.parent / f"step-{best:07d}" if best is not None else latest
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if path.exists():
        raise GptlabError(f"{path} holds no complete checkpoint; pass a run folder or a checkpoints/step-* folder")
    raise GptlabError(f"checkpoint {path} does not exist")


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, checked for everything a loader needs (one clear error otherwise)."""
    try:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise GptlabError(f"{ckpt}/state.json is missing or corrupt; use another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise GptlabError(f"{ckpt} is not a gptlab v{VERSION} checkpoint")
    sha = meta.get("sha256")
    problems = [
        what
        for ok, what in (
            (
                isinstance(sha, dict) and (isinstance(sha.get("model.safetensors"), str) or bool(meta.get("sharded"))),
                "sha256 of model.safetensors",
            ),
            (isinstance(meta.get("model_config"), dict), "model_config"),
            (isinstance(meta.get("tokenizer"), dict), "tokenizer"),
            (type(meta.get("step", 0)) is int and meta.get("step", 0) >= 0, "an integer step"),
        )
        if not ok
    ]
    if problems:
        raise GptlabError(
            f"{ckpt}/state.json lacks {' and '.join(problems)}; the checkpoint is damaged, use another one"
        )
    try:
        GPTConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError, GptlabError) as e:
        raise GptlabError(f"{ckpt}/state.json holds an invalid model_config ({e}); use another checkpoint") from None
    return meta


def _load_tensors(ckpt: Path, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = ckpt / name
    if not path.is_file():
        raise GptlabError(f"{path} is missing; the checkpoint is incomplete, use another one")
    if sha256_of(path) != meta["sha256"][name]:
        raise GptlabError(f"{path} is corrupt (sha256 mismatch); use another checkpoint")
    return read_safetensors(path)


def load_weights(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint, checked against its model config tensor by tensor (a sharded one,
    :mod:`gptlab.train.sharded`, gathered from its shards in this process)."""
    cfg = GPTConfig.from_dict(meta["model_config"])
    if meta.get("sharded"):
        model = skeleton(cfg, meta.get("quantization"), meta.get("lora")).to_empty(device="cpu")
        return with_tied(load_sharded_weights(ckpt, meta, model), cfg)
    sd = _load_tensors(ckpt, "model.safetensors", meta)
    sd = with_tied(sd, cfg)
    check_weights(sd, cfg, f"{ckpt}/model.safetensors", meta.get("quantization"), meta.get("lora"))
    return sd


def load_sharded_weights(ckpt: Path, meta: dict[str, Any], model: GPT) -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint (an FSDP run's: :mod:`gptlab.train.sharded`), in this
    process alone (no process group): the tensors of ``model`` (a model of the checkpoint's config, on the CPU)
    filled from every rank's shards by torch.distributed.checkpoint, a TP-form checkpoint's split projections
    fused back (:mod:`gptlab.tp_form`)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from .tp_form import fuse_state, to_tp_form

    tp_form = meta["sharded"].get("tp", 1) > 1
    if tp_form:
        to_tp_form(model)
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=Path(ckpt) / DCP_DIR, no_dist=True)
    return fuse_state(sd, model) if tp_form else sd


def load_extra(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors (heads) a checkpoint holds besides the GPT, or none."""
    return _load_tensors(ckpt, "heads.safetensors", meta) if "heads.safetensors" in meta["sha256"] else {}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model ready for inference from a run folder or checkpoint folder, and the checkpoint's metadata."""
    ckpt = resolve(path)
    meta = read_state(ckpt)
    quantization = meta.get("quantization")
    model = skeleton(GPTConfig.from_dict(meta["model_config"]), quantization, meta.get("lora"))
    model.load_state_dict(load_weights(ckpt, meta), assign=True)
    if isinstance(model.lm_head, torch.nn.Linear):  # a float head: tied again (a quantized one feeds the embedding)
        model.tie_()
    model = model.to(device).eval()
    if quantization:
        from .quant.quantize import prepare

        prepare(model)
    return model, meta


def load_training_state(ckpt: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(name-keyed optimizer state dict, RNG states) of a checkpoint."""
    tensors = _load_tensors(ckpt, "optimizer.safetensors", meta)
    state: dict[str, dict[str, torch.Tensor]] = {}
    rng = {}
    for key, t in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "rng":
            rng[rest] = t
        else:
            name, k = rest.rsplit("/", 1)
            state.setdefault(name, {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}, rng
