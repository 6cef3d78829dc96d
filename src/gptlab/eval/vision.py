"""Does the model look? Per-attribute exact-match accuracy on an image dataset, and the blind baselines.

For every image of a split and every attribute of the dataset (shapes: colour, shape, size, position, count;
digits: digit), the model answers the attribute's question greedily after the image (``<image> Q: what colour?
A:``); the answer is right when the generated text, stripped, equals the label exactly.

The blind baselines ask the same questions with the image taken away: ``zero`` replaces every image with black,
``shuffle`` gives each question another example's image (a fixed derangement). A model that reads its image
scores at chance there; the chance levels are reported beside them: ``uniform`` (1 / number of answers) and
``majority`` (the most frequent answer's share in the split: the best any image-blind strategy can score).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.image_files import to_tensor
from ..data.images import is_image_dataset
from ..data.loader import read_meta
from ..errors import GptlabError
from ..generate import Engine, Sampling
from .config import BLIND


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of range(n) that moves every element (n >= 2): each example gets another one's image."""
    order = np.random.default_rng(seed).permutation(n)
    return np.roll(order, 1)[np.argsort(order)]


def answer(
    engine: Engine, images: torch.Tensor, question: str, max_new_tokens: int, batch_size: int = 128
) -> list[str]:
    """The model's greedy answers to ``question`` about each image."""
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        done = engine.generate([question] * len(chunk), max_new_tokens, Sampling(temperature=0), images=chunk)
        out += [(c.text or "").strip() for c in done]
    return out


def evaluate_split(
    engine: Engine,
    data_dir: str | Path,
    split: str,
    blind: Sequence[str] = BLIND,
    limit: int | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Accuracy per attribute on one split, with the image, for each blind baseline, and the chance levels."""
    meta = read_meta(data_dir)
    if not is_image_dataset(meta):
        raise GptlabError(f"{data_dir} is not an image dataset (prepare one with `gptlab prepare shapes`)")
    if split not in meta["files"]:
        raise GptlabError(f"{data_dir} has no {split} split (it has {', '.join(meta['files'])})")
    files = meta["files"][split]
    pixels = np.load(Path(data_dir) / files["images"], mmap_mode="r")[:limit]
    labels = np.load(Path(data_dir) / files["labels"])[:limit]
    images = to_tensor(np.asarray(pixels))
    inputs = {"image": images, "zero": torch.zeros_like(images), "shuffle": images[derangement(len(images))]}
    report: dict[str, Any] = {"split": split, "images": len(images)}
    for a, (attribute, question) in enumerate(meta["questions"].items()):
        answers = meta["answers"][attribute]
        truth = [answers[i] for i in labels[:, a]]
        longest = max(len(engine.tokenizer.encode(" " + x)) for x in answers) + 1
        row: dict[str, float] = {}
        for kind in ("image", *blind):
            said = answer(engine, inputs[kind], question, longest, batch_size)
            row[kind] = round(float(np.mean([s == t for s, t in zip(said, truth)])), 4)
        counts = np.bincount(labels[:, a], minlength=len(answers))
        row["uniform"] = round(1 / len(answers), 4)
        row["majority"] = round(float(counts.max() / counts.sum()), 4)
        report[attribute] = row
    return report
