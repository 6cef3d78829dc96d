"""The notebook API: ``gptlab.load(source)`` returns an :class:`LM`, one object to generate with, score with and save.

    import gptlab
    lm = gptlab.load("runs/demo")                     # a run, a checkpoint, a Hugging Face folder or Hub name
    print(lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=200))
    for piece in lm.generate("JULIET:", max_new_tokens=50, stream=True):
        print(piece, end="")
    lm.loglikelihood("The capital of France is", " Paris")
    lm.perplexity(open("notes.txt").read())
    lm.save("hf/demo", format="hf")

It is a thin layer over :func:`gptlab.loader.load_model`, :class:`gptlab.generate.Engine` and
:mod:`gptlab.eval.scoring`; ``lm.model``, ``lm.tokenizer`` and ``lm.config`` are the objects underneath.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

from .checkpoint import save_model_checkpoint
from .data.image_files import as_images
from .errors import GptlabError
from .eval.scoring import loglikelihoods, perplexity_report, rolling_nll
from .generate import Engine, Sampling
from .interop.hf import save_hf
from .loader import Loaded, load_model
from .recipe import DEFAULT_SEED
from .tokenizer import start_id


class LM:
    """A loaded model with its tokenizer: ``generate``, ``loglikelihood``, ``perplexity``, ``save``."""

    def __init__(self, loaded: Loaded, compile: bool = False) -> None:
        self.model, self.tokenizer, self.config, self.source = (
            loaded.model,
            loaded.tokenizer,
            loaded.config,
            loaded.source,
        )
        self._meta = loaded.meta
        self.engine = Engine(self.model, self.tokenizer, compile=compile)

    def __repr__(self) -> str:
        return (
            f"LM({self.source!r}: {self.model.num_params():,} parameters, context {self.config.block_size}, "
            f"vocab {self.config.vocab_size}, on {self.engine.device})"
        )

    @overload
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = ...,
        temperature: float = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float = ...,
        stop: Sequence[str] = ...,
        seed: int = ...,
        stream: bool = ...,
        sliding_window: bool = ...,
        image=...,
    ) -> str | Iterator[str]: ...

    @overload
    def generate(
        self,
        prompt: list[str],
        *,
        max_new_tokens: int | None = ...,
        temperature: float = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float = ...,
        stop: Sequence[str] = ...,
        seed: int = ...,
        stream: bool = ...,
        sliding_window: bool = ...,
        image=...,
    ) -> list[str]: ...

    def generate(
        self,
        prompt,
        *,
        max_new_tokens=None,
        temperature=1.0,
        top_k=None,
        top_p=None,
        min_p=None,
        repetition_penalty=1.0,
        stop=(),
        seed=DEFAULT_SEED,
        stream=False,
        sliding_window=False,
        image=None,
    ):
        """The continuation of ``prompt`` (a string: a string back; a list: a list, decoded as one batch, prompt
        ``i`` with seed ``seed + i``). ``max_new_tokens=None`` generates to the end of the context (or to the
        end-of-text token). ``temperature=0`` is greedy. ``stream=True`` (one prompt) yields text pieces as they
        are decoded, whole characters only. ``image`` (a model trained on images): a file path, encoded bytes, a
        uint8 array or a float tensor, one image or one per prompt, placed before the prompt (docs/vision.md)."""
        sampling = Sampling(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise GptlabError("generate needs a prompt (a string) or a non-empty list of prompts")
        images = None if image is None else as_images(image, self.config)
        if images is not None and len(images) == 1:
            images = images.expand(len(prompts), -1, -1, -1)
        if max_new_tokens is None:
            with_image = images is not None
            longest = max(len(self.engine.encode_prompt(p, with_image)) for p in prompts)
            longest += self.config.image_tokens if with_image else 0
            max_new_tokens = max(self.config.block_size - longest, 1) if not sliding_window else self.config.block_size
        if stream:
            if not isinstance(prompt, str):
                raise GptlabError("stream=True streams one prompt; pass a string")
            return self.engine.stream(
                prompt, max_new_tokens, sampling, stop, sliding_window=sliding_window, image=images
            )
        done = self.engine.generate(
            prompts, max_new_tokens, sampling, stop, sliding_window=sliding_window, images=images
        )
        out = [c.text for c in done]
        return out[0] if isinstance(prompt, str) else out

    def loglikelihood(
        self, context: str | Sequence[tuple[str, str]], continuation: str | None = None, batch_size: int = 8
    ) -> float | list[float]:
        """log p(continuation | context) in nats, as lm-eval scores it (an empty context is the end-of-text
        token). Pass a list of (context, continuation) pairs to score them in batches."""
        pairs = [(context, continuation)] if isinstance(context, str) else list(context)
        if isinstance(context, str) and continuation is None:
            raise GptlabError("loglikelihood(context, continuation): give the continuation to score")
        requests = [(self.engine.encode_prompt(c), self.tokenizer.encode(x or "")) for c, x in pairs]
        scores = [lp for lp, _ in loglikelihoods(self.model, requests, batch_size)]
        return scores[0] if isinstance(context, str) else scores

    def perplexity(self, text: str, *, stride: int | None = None, batch_size: int = 8) -> float:
        """Token perplexity of ``text`` with a sliding window, scored as ``gptlab eval perplexity`` does (every
        token, the first after an end-of-text token; ``stride`` defaults to half the context)."""
        ids = [start_id(self.tokenizer)] + self.tokenizer.encode(text)
        nll, n = rolling_nll(self.model, ids, stride, batch_size)
        return perplexity_report(nll, n)["token_perplexity"]

    def save(self, out_dir: str | Path, format: str = "gptlab") -> Path:
        """Write the model and tokenizer to a new folder: a gptlab checkpoint, or (``format="hf"``) a Hugging Face
        folder that ``transformers`` loads with ``from_pretrained``. A quantized model is saved quantized (it loads
        back as it is), or dequantized into a Hugging Face folder."""
        if format not in ("gptlab", "hf"):
            raise GptlabError(f"format must be gptlab or hf, not {format!r}")
        from .quant.quantize import export_state

        state, extra = export_state(self.model, format)
        if format == "hf":
            return save_hf(state, self.config, self._meta["tokenizer"], Path(out_dir), source=self.source)
        return save_model_checkpoint(
            Path(out_dir), state, self.config, self._meta["tokenizer"], source=self.source, **extra
        )


def load(source: str | Path, device: str = "auto", compile: bool = False, quantize: str | None = None) -> LM:
    """Load any model source (see :mod:`gptlab.loader`) as an :class:`LM`; ``compile=True`` compiles its decode step,
    ``quantize="int8" | "int4"`` quantizes its weights (:mod:`gptlab.quant`)."""
    return LM(load_model(source, device, quantize=quantize), compile=compile)
