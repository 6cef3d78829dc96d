"""What ``gptlab quantize`` is asked for: one config, whose fields are also the command's flags (:mod:`gptlab.recipe`).
The modes and the group size are the defaults of on-the-fly quantization (``--quantize``) too."""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import RecipeConfig, opt

QUANTIZE_MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64  # int4's group where the source gives none (a GGUF file in quantized blocks gives 32)


@dataclass
class QuantizeConfig(RecipeConfig):
    help_hint = "`gptlab quantize --help`"
    what = "quantize settings"

    model: str = opt("", "the float model to quantize (any source `gptlab.load` reads)")
    mode: str | None = opt(
        None, "int8: per output channel; int4: groups of --group-size input columns", choices=QUANTIZE_MODES, kind=str
    )
    group_size: int | None = opt(
        None,
        f"int4: input columns per group, each with a scale and an offset (default {DEFAULT_GROUP_SIZE}; 32 for a GGUF "
        "file stored in quantized blocks, its own grid)",
        choices=GROUP_SIZES,
        kind=int,
    )
    exclude: list[str] = opt([], "keep this layer in float (e.g. lm_head); repeatable", metavar="NAME")
    head_mode: str | None = opt(
        None,
        "the head's own mode (and a tied embedding's), e.g. int8 under --mode int4, as llama.cpp's 4-bit files keep "
        "their output matrix at 8 or 6 bits (default: the mode; int8 under int4 for a GGUF file whose head is stored "
        "at 6 bits or more)",
        choices=QUANTIZE_MODES,
        kind=str,
    )
    out_dir: str = opt("", "the new checkpoint folder")

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.model), "a model is required: gptlab quantize MODEL"),
            (self.mode is not None, "--mode is required: int8 or int4"),
            (bool(self.out_dir), "--out-dir is required: the new checkpoint folder"),
        ]
