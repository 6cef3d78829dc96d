"""``gptlab prepare SOURCES... --out-dir DIR``: text to train/val token shards (see :mod:`gptlab.data.prepare`)."""

from __future__ import annotations

import argparse

from ..errors import GptlabError
from ..options import add_json, add_out_dir, count, emit, number
from ..recipe import Range
from ..tokenizer import TOKENIZER_KINDS

IMAGE_SOURCES = ("shapes", "digits")


def cmd_prepare(args: argparse.Namespace) -> None:
    # here, not at the top: tokenizer libraries load slowly and other verbs skip them
    from .prepare import prepare, prepare_images

    if any(s in IMAGE_SOURCES for s in args.sources):
        if len(args.sources) != 1:
            raise GptlabError(
                f"an image dataset ({' or '.join(IMAGE_SOURCES)}) is prepared on its own; name one source"
            )
        meta = prepare_images(args.sources[0], args.out_dir, args.images, args.image_size, args.seed)
        counts = ", ".join(f"{n:,} {k}" for k, n in meta["images"].items())
        return emit(
            args,
            meta,
            f"prepared {meta['source']}: {counts} images of {meta['image_size']}x{meta['image_size']}x"
            f"{meta['image_channels']} with texts of up to {meta['text_tokens']} tokens (vocab {meta['vocab_size']}) "
            f"in {meta['out_dir']} [{meta['seconds']}s]",
        )
    meta = prepare(
        args.sources,
        args.out_dir,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        field=args.field,
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
    p.add_argument(
        "sources",
        nargs="+",
        help="files, folders, .jsonl/.parquet, http(s) URLs, or a named corpus (shakespeare, tinyshakespeare); "
        "or one image dataset: shapes (synthetic) or digits (scikit-learn's 8x8 digits), see docs/vision.md",
    )
    add_out_dir(p, "dataset folder to write", required=True)
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        choices=TOKENIZER_KINDS,
        help="gpt2 (tiktoken's GPT-2 BPE), char, or bpe (trained here; default gpt2)",
    )
    p.add_argument(
        "--vocab-size",
        type=count(2, 2**32 - 1),
        help="vocabulary size of a trained bpe tokenizer (valid: [2, 4294967295])",
    )
    p.add_argument(
        "--val-fraction",
        type=number(Range(0, 1, lo_open=True, hi_open=True)),
        default=0.1,
        help="tail of the token stream held out (valid: (0, 1); default 0.1)",
    )
    p.add_argument("--field", default="text", help="JSONL field / parquet column holding the text (default text)")
    p.add_argument(
        "--images",
        type=count(10, 10_000_000),
        default=10_000,
        help="shapes: training images; val and holdout get a tenth each (valid: [10, 10000000]; default 10000)",
    )
    p.add_argument(
        "--image-size",
        type=count(8, 512),
        default=32,
        help="shapes: side in pixels, a multiple of 8 (valid: [8, 512]; default 32)",
    )
    p.add_argument(
        "--seed",
        type=count(0, 2**32 - 1),
        default=0,
        help="shapes and digits: the seed (valid: [0, 2^32-1]; default 0)",
    )
    add_json(p)
    p.set_defaults(func=cmd_prepare)
