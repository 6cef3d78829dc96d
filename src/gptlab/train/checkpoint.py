"""Checkpoints: one folder per step, written atomically, verified on load.

``<run>/checkpoints/step-0000500/`` holds ``model.safetensors`` (weights; a tied head is stored once),
``optimizer.safetensors`` (AdamW moments and step counts, keyed by parameter name, plus the RNG states) and
``state.json`` (step, model and training config, tokenizer spec, best val loss, the sha256 of both tensor files).
The folder is assembled under a temporary name, every file fsynced, then renamed into place, so a crash at any moment
leaves either the whole checkpoint or none. The last ``keep_last`` checkpoints and the best one are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..assets import sha256_of
from ..config import GPTConfig
from ..errors import GptlabError
from ..model import GPT

FORMAT = "gptlab-checkpoint"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return sha256_of(path)


def weights_for_saving(state_dict: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The model's tensors with the tied head dropped (it is the token embedding)."""
    return {k: v for k, v in state_dict.items() if not (cfg.tie_weights and k == "lm_head.weight")}


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones. ``optim_state`` is a name-keyed optimizer state
    dict (``torch.distributed.checkpoint.state_dict`` layout); ``state`` is JSON-able metadata."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cfg = GPTConfig.from_dict(state["model_config"])
        tensors, groups = {}, []
        for name, st in optim_state["state"].items():
            for k, v in st.items():
                tensors[f"state/{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for g in optim_state["param_groups"]:
            groups.append({k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])})
        for k, v in state.pop("rng").items():
            tensors[f"rng/{k}"] = v
        meta = dict(state, format=FORMAT, version=VERSION, step=step, param_groups=groups,
                    sha256={"model.safetensors": _save_tensors(weights_for_saving(model_state, cfg),
                                                               tmp / "model.safetensors"),
                            "optimizer.safetensors": _save_tensors(tensors, tmp / "optimizer.safetensors")})
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    keep = {p.name for p in list_checkpoints(run_dir)[-keep_last:]}
    if meta.get("best_step") is not None:
        keep.add(f"step-{meta['best_step']:07d}")
    for p in list_checkpoints(run_dir):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), ``<run>/best``, or a checkpoint folder."""
    path = Path(path)
    if path.name == "best" and not path.exists():
        latest = resolve(path.parent)
        best = json.loads((latest / "state.json").read_text()).get("best_step")
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
    try:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise GptlabError(f"{ckpt}/state.json is missing or corrupt; use another checkpoint") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise GptlabError(f"{ckpt} is not a gptlab v{VERSION} checkpoint")
    return meta


def _load_tensors(ckpt: Path, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = ckpt / name
    if not path.is_file():
        raise GptlabError(f"{path} is missing; the checkpoint is incomplete, use another one")
    if sha256_of(path) != meta["sha256"][name]:
        raise GptlabError(f"{path} is corrupt (sha256 mismatch); use another checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"{path} cannot be read ({e}); use another checkpoint") from None


def load_weights(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint, checked against its model config tensor by tensor."""
    cfg = GPTConfig.from_dict(meta["model_config"])
    sd = _load_tensors(ckpt, "model.safetensors", meta)
    if cfg.tie_weights and "wte.weight" in sd:
        sd["lm_head.weight"] = sd["wte.weight"]
    with torch.device("meta"):
        expected = GPT(cfg).state_dict()
    for name, t in expected.items():
        if name not in sd:
            raise GptlabError(f"{ckpt}: tensor {name!r} is missing from model.safetensors")
        if sd[name].shape != t.shape:
            raise GptlabError(f"{ckpt}: tensor {name!r} has shape {tuple(sd[name].shape)}, the config needs "
                              f"{tuple(t.shape)}")
    extra = set(sd) - set(expected)
    if extra:
        raise GptlabError(f"{ckpt}: model.safetensors has unexpected tensors {sorted(extra)[:3]}")
    return sd


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model ready for inference from a run folder or checkpoint folder, and the checkpoint's metadata."""
    ckpt = resolve(path)
    meta = read_state(ckpt)
    model = GPT(GPTConfig.from_dict(meta["model_config"]))
    model.load_state_dict(load_weights(ckpt, meta))
    return model.to(device).eval(), meta


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
