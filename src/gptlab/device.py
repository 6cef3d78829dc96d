"""Which device a command runs on: ``--device auto | cpu | cuda | cuda:N | mps``."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import GptlabError


def cpu_info() -> tuple[str, str]:
    """The CPU's model name and its flags (Linux: the first processor in ``/proc/cpuinfo``); elsewhere what
    ``platform`` knows, and no flags."""
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("model name") or platform.processor() or platform.machine(), fields.get("flags", "")


def pick_device(pref: str | torch.device, local_rank: int = 0) -> torch.device:
    """The device for ``auto | cpu | cuda | cuda:N | mps`` (auto: CUDA, else MPS, else CPU), or one clear error."""
    if isinstance(pref, torch.device):
        return pref
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = str(pref).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise GptlabError(f"--device {pref!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"--device {pref} was asked for but CUDA is not available here; use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise GptlabError(f"--device {pref}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptlabError("--device mps was asked for but MPS is not available here; use --device cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev
