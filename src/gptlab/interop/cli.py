"""``gptlab convert MODEL --out-dir DIR``: gptlab checkpoints <-> Hugging Face folders; OpenAI releases -> gptlab."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..files import refuse_existing
from ..options import add_json, add_model, add_out_dir, emit


def cmd_convert(args: argparse.Namespace) -> None:
    from ..checkpoint import save_model_checkpoint  # here, not at the top: torch and safetensors load slowly
    from ..loader import load_model
    from ..lora import adapters, merge, trainable_summary
    from ..quant.quantize import export_state
    from .hf import save_hf  # (the three: torch, safetensors and the tokenizer libraries load slowly)
    from .peft import load_adapter, save_peft

    if (args.out or "").endswith(".gguf") or (args.out_dir or "").endswith(".gguf") or args.to == "gguf":
        return _convert_gguf(args)
    if args.out:  # the old positional output folder
        print(
            "gptlab: warning: the positional output folder is deprecated and will be removed in the next release; "
            "use --out-dir",
            file=sys.stderr,
        )
        if args.out_dir not in (None, args.out):
            raise GptlabError(f"the output folder {args.out} contradicts --out-dir {args.out_dir}; give one of them")
        args.out_dir = args.out
    if not args.out_dir:
        raise GptlabError("give the output folder: gptlab convert MODEL --out-dir DIR")
    loaded = load_model(args.model, "cpu")
    model, meta = loaded.model, loaded.meta
    to = args.to or ("hf" if meta.get("format") == "gptlab-checkpoint" else "gptlab")
    if args.lora:
        load_adapter(args.lora, model)
    if args.lora or args.merge_lora:
        merge(model)
    if to == "peft":
        if not adapters(model):
            raise GptlabError(f"{args.model} carries no LoRA adapters; --to peft writes those of a LoRA run")
        out = save_peft(model, Path(args.out_dir), base=str(meta.get("train_config", {}).get("model", "")))
        summary = {"model": str(args.model), "out_dir": str(out), "to": to, **trainable_summary(model)}
        return emit(args, summary, f"wrote the PEFT adapter of {args.model} to {out}")
    state, extra = export_state(model, to)
    if to == "hf":
        out = save_hf(state, model.config, meta["tokenizer"], Path(args.out_dir), source=str(args.model))
    else:
        out = save_model_checkpoint(
            Path(args.out_dir), state, model.config, meta["tokenizer"], source=str(args.model), **extra
        )
    result: dict[str, Any] = {
        "model": str(args.model),
        "out_dir": str(out),
        "to": to,
        "params": model.num_params(),
        "files": sorted(p.name for p in out.iterdir()),
    }
    emit(args, result, f"wrote {to} model ({result['params']:,} parameters) to {out}: {', '.join(result['files'])}")


def _convert_gguf(args: argparse.Namespace) -> None:
    """``gptlab convert MODEL out.gguf [--gguf-type f32|f16|q8_0]``: llama.cpp's format (:mod:`gptlab.interop.gguf`)."""
    from ..loader import load_model
    from .gguf import save_gguf
    from .peft import load_adapter

    target = args.out or args.out_dir
    if not target:
        raise GptlabError("give the output file: gptlab convert MODEL out.gguf")
    from ..quant.quantize import export_state

    refuse_existing(target)
    loaded = load_model(args.model, "cpu")
    if args.lora:
        load_adapter(args.lora, loaded.model)
    state, _ = export_state(loaded.model, "gguf")
    path = save_gguf(state, loaded.config, loaded.meta["tokenizer"], Path(target), args.gguf_type)
    result = {"model": str(args.model), "out": str(path), "to": "gguf", "type": args.gguf_type,
              "bytes": path.stat().st_size, "params": loaded.model.num_params()}  # fmt: skip
    emit(args, result, f"wrote GGUF {args.gguf_type} ({result['bytes'] / 2**20:,.1f} MiB) to {path}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between gptlab checkpoints and Hugging Face / OpenAI models")
    add_model(p, "convert", old=())
    p.add_argument("out", nargs="?", help="out.gguf: a GGUF file (a folder here is deprecated: use --out-dir)")
    add_out_dir(p, "new output folder (never overwritten)", old=())
    p.add_argument(
        "--to",
        choices=["hf", "gptlab", "gguf", "peft"],
        help="output format (default: gguf for an output ending in .gguf, else hf for a gptlab checkpoint, gptlab for "
        "anything else); peft: the adapters of a LoRA run, as a Hugging Face PEFT folder",
    )
    p.add_argument(
        "--lora",
        metavar="ADAPTER",
        help="merge this LoRA adapter (a PEFT folder, or a gptlab LoRA run) into MODEL before writing it",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold the adapters a LoRA run carries into its weights (HF and GGUF outputs always merge them)",
    )
    p.add_argument(
        "--gguf-type",
        choices=["f32", "f16", "q8_0", "q4_0"],
        default="f32",
        help="GGUF tensor type of the matrices (f32)",
    )
    add_json(p)
    p.set_defaults(func=cmd_convert)
