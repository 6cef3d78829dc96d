"""Image-text datasets made offline, and their training loader.

``gptlab prepare shapes`` draws a deterministic, seeded set of small RGB images: 1 to 3 copies of one shape
(circle, square, triangle, cross) in one colour (6), one size (small, big), inside one quadrant of a dark, noisy
canvas. Each image has a caption and one question-answer pair per attribute (colour, shape, size, position,
count). Four colour-shape pairs never appear in training or validation: the ``holdout`` split holds only those
(the compositional hold-out; every colour and every shape is still seen, with other partners).

``gptlab prepare digits`` turns scikit-learn's bundled 8x8 handwritten digits (1,797 images of the UCI "Optical
Recognition of Handwritten Digits" set; no download) into grey images with a caption and a question; a seeded
sixth of them is held out as ``val``.

A dataset folder holds ``meta.json`` (format ``gptlab-images``) and, per split, ``{split}_images.npy`` (uint8
[N, S, S, C]), ``{split}_texts.npy`` (int32 [N, K, L]: K texts per image, each ``eot + text + eot``, padded with
-1) and ``{split}_labels.npy`` (int16 [N, attributes]: the answer's index per attribute). It is written like a
token dataset: built beside the target and swapped in atomically (:func:`gptlab.data.prepare.write_dataset`).

The loader draws, per row, an image and one of its texts, as a pure function of ``(seed, split, step, micro)``
like the token loader, so resumed runs repeat the uninterrupted batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GptlabError
from ..files import atomic_file, atomic_write_text
from ..tokenizer import CharTokenizer, prompt_ids
from .image_files import to_tensor

FORMAT = "gptlab-images"
COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 185, 65),
    "blue": (55, 85, 235),
    "yellow": (230, 215, 45),
    "magenta": (205, 55, 205),
    "cyan": (45, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "big")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("1", "2", "3")
HOLDOUT = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
SHAPE_QUESTIONS = {
    "colour": "Q: what colour? A:",
    "shape": "Q: what shape? A:",
    "size": "Q: what size? A:",
    "position": "Q: where? A:",
    "count": "Q: how many? A:",
}
SHAPE_ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
}
DIGIT_QUESTIONS = {"digit": "Q: what digit? A:"}
DIGIT_ANSWERS = {"digit": tuple("0123456789")}


def shape_mask(shape: str, d: int) -> np.ndarray:
    """A d x d boolean mask of ``shape``."""
    y, x = np.mgrid[0:d, 0:d] + 0.5
    c = d / 2
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= c**2
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "triangle":  # pointing up: the half-width grows from the apex row to the base
        return np.abs(x - c) <= y / 2
    if shape == "cross":  # a plus sign, arms a third of the side thick
        return (np.abs(x - c) <= d / 6 + 0.01) | (np.abs(y - c) <= d / 6 + 0.01)
    raise ValueError(shape)


def render_shapes(
    rng: np.random.Generator, size: int, colour: str, shape: str, big: bool, quadrant: int, count: int
) -> np.ndarray:
    """One uint8 [size, size, 3] image: ``count`` copies of the shape in distinct cells of a 2 x 2 grid inside
    ``quadrant`` (0 top left, 1 top right, 2 bottom left, 3 bottom right), on dark noise."""
    img = rng.integers(0, 36, size=(size, size, 3)).astype(np.int16)
    cell = size // 4  # >= 4: the documented sizes start at 16 pixels
    d = (cell - 1 if cell > 4 else cell) if big else max(3, cell // 2 + 1)  # big is always the larger
    qy, qx = divmod(quadrant, 2)
    for k in rng.permutation(4)[:count]:
        cy, cx = divmod(int(k), 2)
        y0 = (qy * 2 + cy) * cell + int(rng.integers(0, cell - d + 1))
        x0 = (qx * 2 + cx) * cell + int(rng.integers(0, cell - d + 1))
        tint = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255)
        img[y0 : y0 + d, x0 : x0 + d][shape_mask(shape, d)] = tint
    return img.astype(np.uint8)


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + ("es" if shape.endswith("s") else "s")


def shapes_split(
    n: int, size: int, rng: np.random.Generator, holdout: bool
) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """``n`` images with their texts (caption first, then one question per attribute) and labels."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HOLDOUT) == holdout]
    images, texts, labels = [], [], []
    for _ in range(n):
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        big, quadrant, count = bool(rng.integers(2)), int(rng.integers(4)), int(rng.integers(1, 4))
        images.append(render_shapes(rng, size, colour, shape, big, quadrant, count))
        answers = {
            "colour": colour,
            "shape": shape,
            "size": SIZES[big],
            "position": POSITIONS[quadrant],
            "count": str(count),
        }
        caption = f"{count} {answers['size']} {colour} {plural(shape, count)}, {answers['position']}"
        texts.append([caption] + [f"{SHAPE_QUESTIONS[a]} {answers[a]}" for a in SHAPE_QUESTIONS])
        labels.append([SHAPE_ANSWERS[a].index(answers[a]) for a in SHAPE_QUESTIONS])
    return np.stack(images), texts, np.array(labels, dtype=np.int16)


def build_shapes(count: int, size: int, seed: int) -> dict[str, Any]:
    if size % 8:
        raise GptlabError(f"--image-size {size} must be a multiple of 8 (a grid of 4 x 4 cells)")
    if size < 16:
        raise GptlabError(f"--image-size {size} is too small: a big and a small shape need cells of 4 pixels (16)")
    rng = np.random.default_rng(seed)
    n_val = max(1, count // 10)
    splits = {
        "train": shapes_split(count, size, rng, holdout=False),
        "val": shapes_split(n_val, size, rng, holdout=False),
        "holdout": shapes_split(n_val, size, rng, holdout=True),
    }
    info = {"questions": SHAPE_QUESTIONS, "answers": SHAPE_ANSWERS, "holdout_pairs": HOLDOUT}
    return {"splits": splits, "info": info}


def build_digits(seed: int) -> dict[str, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GptlabError(
            "`gptlab prepare digits` reads scikit-learn's bundled digits: pip install 'gptlab[vision]'"
        ) from None
    d = load_digits()
    pixels = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]  # 0..16 -> 0..255, one channel
    order = np.random.default_rng(seed).permutation(len(pixels))
    n_val = len(pixels) // 6
    splits = {}
    for split, rows in (("train", order[n_val:]), ("val", order[:n_val])):
        targets = d.target[rows]
        texts = [[f"the digit {t}", f"{DIGIT_QUESTIONS['digit']} {t}"] for t in targets]
        splits[split] = (pixels[rows], texts, targets[:, None].astype(np.int16))
    return {"splits": splits, "info": {"questions": DIGIT_QUESTIONS, "answers": DIGIT_ANSWERS}}


def write_image_dataset(
    build: Path, source: str, splits: dict[str, Any], info: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Tokenize the texts (a character vocabulary over every split's texts) and write the arrays and meta.json."""
    tok = CharTokenizer.train(t for _, texts, _ in splits.values() for row in texts for t in row)
    encoded = {
        s: [[[*prompt_ids(tok, t, after_image=True), tok.eot_id] for t in row] for row in texts]
        for s, (_, texts, _) in splits.items()
    }
    length = max(len(t) for rows in encoded.values() for row in rows for t in row)
    files: dict[str, dict[str, str]] = {}
    counts: dict[str, int] = {}
    for split, (images, _, labels) in splits.items():
        rows = encoded[split]
        texts = np.full((len(rows), len(rows[0]), length), -1, dtype=np.int32)
        for i, row in enumerate(rows):
            for k, t in enumerate(row):
                texts[i, k, : len(t)] = t
        files[split] = {}
        for kind, arr in (("images", images), ("texts", texts), ("labels", labels)):
            name = f"{split}_{kind}.npy"
            with atomic_file(build / name) as f:
                np.save(f, arr)
            files[split][kind] = name
        counts[split] = len(images)
    meta = {
        "format": FORMAT,
        "version": 1,
        "source": source,
        "seed": seed,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "image_size": int(splits["train"][0].shape[1]),
        "image_channels": int(splits["train"][0].shape[3]),
        "text_tokens": length,
        "images": counts,
        "files": files,
        **info,
    }
    atomic_write_text(build / "meta.json", json.dumps(meta, indent=1))
    return meta


def is_image_dataset(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


class ImageExamples:
    """Batches of (text inputs, text targets, images) from one split of an image dataset; the same interface as
    :class:`gptlab.data.loader.TokenWindows`. Inputs are padded with the end-of-text id, targets with -1 (no loss);
    ``block_size`` must hold the image prefix and the longest text."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, seed: int = 0, prefix: int = 0) -> None:
        from .loader import read_meta

        meta = read_meta(data_dir)
        if split not in meta["files"]:
            raise GptlabError(f"{data_dir} has no {split} split (it has {', '.join(meta['files'])})")
        names = meta["files"][split]
        self.images = np.load(Path(data_dir) / names["images"], mmap_mode="r")
        self.texts = np.load(Path(data_dir) / names["texts"], mmap_mode="r")
        self.labels = np.load(Path(data_dir) / names["labels"])
        self.eot, self.seed, self.split_id = meta["eot_id"], seed, sorted(meta["files"]).index(split) + 7
        if prefix + meta["text_tokens"] - 1 > block_size:
            raise GptlabError(
                f"block_size {block_size} cannot hold the image prefix ({prefix} tokens) and the longest text "
                f"({meta['text_tokens'] - 1} inputs); use --block-size {prefix + meta['text_tokens'] - 1} or more"
            )
        self.num_tokens = int((self.texts >= 0).sum())

    def rows(self, image: np.ndarray, text: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(self.texts[image, text].astype(np.int64))
        x = t[:, :-1].clone()
        x[x < 0] = self.eot
        return x, t[:, 1:], to_tensor(self.images[image])

    def batch(
        self, batch_size: int, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.split_id, step, micro_step])
        image = rng.integers(0, len(self.images), size=batch_size * world_size)
        text = rng.integers(0, self.texts.shape[1], size=batch_size * world_size)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        return self.rows(image[mine], text[mine])

    def sequential(self, batch_size: int, max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every (image, text) pair once, in order (up to about ``max_tokens`` target tokens)."""
        pairs = np.stack(np.meshgrid(np.arange(len(self.images)), np.arange(self.texts.shape[1]), indexing="ij"), -1)
        pairs = pairs.reshape(-1, 2)
        if max_tokens:
            per = max(1.0, self.num_tokens / len(pairs))
            pairs = pairs[: max(1, int(max_tokens / per))]
        for i in range(0, len(pairs), batch_size):
            yield self.rows(pairs[i : i + batch_size, 0], pairs[i : i + batch_size, 1])
