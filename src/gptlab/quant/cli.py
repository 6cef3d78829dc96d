"""``gptlab quantize MODEL --mode int8|int4 --out-dir D``: a weight-only quantized copy of any model source, saved as
a gptlab checkpoint that every verb loads as it loads any model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..files import refuse_existing
from ..options import add_config_flags, add_json, add_model, add_out_dir, config_from_flags, emit
from .config import QuantizeConfig


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..checkpoint import save_model_checkpoint
    from ..errors import GptlabError
    from ..loader import load_model, quantize_settings
    from .quantize import QuantLinear, quantize_model, sqnr_db, weight_bytes

    cfg = config_from_flags(args, QuantizeConfig, ("model", "out_dir"), model=args.model, out_dir=args.out_dir)
    refuse_existing(cfg.out_dir, "--out-dir")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, "cpu")
    if loaded.meta.get("quantization"):
        raise GptlabError(f"{cfg.model} is already quantized; quantize the float model")
    model = loaded.model
    before = weight_bytes(model)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight") and n}
    exclude = tuple(cfg.exclude)
    group, head = quantize_settings(loaded.meta, cfg.mode, cfg.group_size, cfg.head_mode, exclude)
    quantize_model(model, cfg.mode, group, exclude, head)
    sqnr = {n: sqnr_db(floats[n], m.dequantized()) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    record: dict[str, Any] = model.quantization  # type: ignore[assignment]
    save_model_checkpoint(
        Path(cfg.out_dir), model.state_dict(), model.config, loaded.tokenizer.spec(), quantization=record,
        quantized_from=str(cfg.model),
    )  # fmt: skip
    after = weight_bytes(model)
    result = {
        "out_dir": cfg.out_dir,
        "quantization": record,
        "layers": len(sqnr),
        "weight_bytes": {"before": before, "after": after, "ratio": round(before / after, 2)},
        "sqnr_db": {"min": round(min(sqnr.values()), 2), "mean": round(sum(sqnr.values()) / len(sqnr), 2)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    grid = f", groups of {record['group_size']}" if record["group_size"] else ""
    head_note = f", head {record['head_mode']}" if record.get("head_mode") else ""
    emit(
        args,
        result,
        f"{cfg.mode}{grid}{head_note}: {len(sqnr)} layers, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB of "
        f"weights, SQNR min {result['sqnr_db']['min']} dB, mean {result['sqnr_db']['mean']} dB -> {cfg.out_dir}",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a model, saved as a checkpoint",
        description="Quantize a model's linear layers (int8: per output channel; int4: groups of --group-size "
        "input columns with a scale and offset each) and save a gptlab checkpoint that sample, eval, serve and "
        "gptlab.load() read as any model. A tied embedding + head is quantized once unless excluded.",
    )
    add_model(p, "quantize", old=())
    add_config_flags(p, QuantizeConfig, ("model", "out_dir"))
    add_out_dir(p, "the new checkpoint folder", required=True, old=())
    add_json(p)
    p.set_defaults(func=cmd_quantize)
