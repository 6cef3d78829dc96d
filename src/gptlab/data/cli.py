"""``gptlab prepare SOURCES... --out-dir DIR``: text to train/val token shards (see :mod:`gptlab.data.prepare`)."""

from __future__ import annotations

import argparse

from ..options import add_config_flags, add_json, add_out_dir, config_from_flags, emit
from .config import IMAGE_SOURCES, PrepareConfig


def cmd_prepare(args: argparse.Namespace) -> None:
    # here, not at the top: tokenizer libraries load slowly and other verbs skip them
    from .prepare import prepare, prepare_images

    cfg = config_from_flags(args, PrepareConfig, ("sources", "out_dir"), sources=args.sources, out_dir=args.out_dir)
    if cfg.sources[0] in IMAGE_SOURCES:
        meta = prepare_images(cfg.sources[0], cfg.out_dir, cfg.images, cfg.image_size, cfg.seed)
        counts = ", ".join(f"{n:,} {k}" for k, n in meta["images"].items())
        return emit(
            args,
            meta,
            f"prepared {meta['source']}: {counts} images of {meta['image_size']}x{meta['image_size']}x"
            f"{meta['image_channels']} with texts of up to {meta['text_tokens']} tokens (vocab {meta['vocab_size']}) "
            f"in {meta['out_dir']} [{meta['seconds']}s]",
        )
    meta = prepare(
        cfg.sources,
        cfg.out_dir,
        tokenizer=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        field=cfg.field,
        tokenizer_from=cfg.tokenizer_from,
        progress=not args.json,
    )
    emit(
        args,
        meta,
        f"prepared {meta['documents']} document(s), {meta['text_chars']:,} characters -> "
        f"{meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens "
        f"(vocab {meta['vocab_size']:,}, {meta['dtype']}) in {meta['out_dir']} [{meta['seconds']}s]",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text into train/val token shards",
        description="Tokenize files, folders, JSON lines, parquet, URLs or a named corpus into a "
        "dataset folder. Only a new or empty folder, or an earlier gptlab dataset, is "
        "written (the dataset is swapped in atomically).",
    )
    p.add_argument("sources", nargs="+", help=PrepareConfig.fields()[0].metadata["help"])
    add_out_dir(p, "dataset folder to write", required=True)
    add_config_flags(p, PrepareConfig, ("sources", "out_dir"))
    add_json(p)
    p.set_defaults(func=cmd_prepare)
