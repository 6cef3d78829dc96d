"""LoRA and QLoRA for every training verb: the ``[lora]`` config (flags ``--lora-rank`` ... ``--quantize``) and the
model a run trains (:func:`for_training`); the adapters themselves are :mod:`gptlab.lora`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GptlabError
from ..lora import adapters, add_lora, merge
from ..model import GPT
from ..recipe import NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_1, RecipeConfig, opt


@dataclass
class LoraConfig(RecipeConfig):
    """LoRA and QLoRA for every training verb (``gptlab train``, ``distill``, each ``align`` stage): recipe table
    ``[lora]``, flags ``--lora-rank`` ... ``--quantize``. ``lora_rank = 0`` trains every weight."""

    help_hint = "`gptlab align sft --help`"
    what = "LoRA config"
    lora_rank: int = opt(0, "LoRA rank r: train only low-rank adapters of the projections; 0 trains every weight",
                         NON_NEGATIVE)  # fmt: skip
    lora_alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha / r", POSITIVE)
    lora_dropout: float = opt(0.0, "dropout on the adapters' input", PROBABILITY_BELOW_1)
    lora_targets: str = opt("all", "projections to adapt: comma-separated q,k,v,o,gate,up,down, or all")
    quantize: str = opt("none", "QLoRA: hold the frozen base in int8 or int4 (needs lora_rank > 0)",
                        choices=("none", "int8", "int4"))  # fmt: skip

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.quantize == "none" or self.lora_rank > 0, "--quantize (QLoRA) needs --lora-rank > 0")]


def for_training(model: GPT, cfg: LoraConfig) -> GPT:
    """``model`` made ready for a run with ``cfg``: adapters it carries are merged first (a LoRA SFT run feeding
    GRPO starts from the SFT policy); then, for LoRA, the base is quantized if asked (QLoRA) and fresh adapters are
    attached with everything else frozen."""
    if adapters(model):
        if getattr(model, "quantization", None):
            raise GptlabError(
                "the model is a QLoRA run (quantized base + adapters); merge it into the float base first: "
                "gptlab convert BASE --lora RUN --out-dir MERGED"
            )
        merge(model)
    if not cfg.lora_rank:
        if getattr(model, "quantization", None):
            raise GptlabError("a quantized model trains only through adapters: add --lora-rank (QLoRA)")
        return model
    if cfg.quantize != "none":
        from ..quant.config import DEFAULT_GROUP_SIZE
        from ..quant.quantize import quantize_model

        if getattr(model, "quantization", None):
            raise GptlabError("the model is already quantized; drop --quantize")
        # the head (and a tied embedding) stays in float, as bitsandbytes' QLoRA keeps lm_head
        quantize_model(model, cfg.quantize, DEFAULT_GROUP_SIZE, exclude=("lm_head",))
    return add_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
