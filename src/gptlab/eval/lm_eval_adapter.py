"""EleutherAI lm-evaluation-harness adapter: any lm-eval task on any gptlab model.

    pip install 'gptlab[lm-eval]'

    import lm_eval
    from gptlab.eval.lm_eval_adapter import GptlabLM   # also registers the model name "gptlab"
    lm_eval.simple_evaluate(model=GptlabLM("runs/demo", batch_size=8), tasks=["lambada_openai", "hellaswag"])

The three request types map onto gptlab's own scorer and engine: ``loglikelihood`` onto
:func:`gptlab.eval.scoring.loglikelihoods` (an empty context becomes the end-of-text token, as lm-eval's HF model
does), ``loglikelihood_rolling`` onto :func:`~gptlab.eval.scoring.rolling_nll` with stride = context after an
end-of-text prefix (lm-eval's disjoint windows, the last with full context), and ``generate_until`` onto the
KV-cached engine, greedy, cut at the request's ``until`` strings.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..generate import Engine, Sampling
from ..loader import load_model
from ..tokenizer import prompt_ids, start_id
from .scoring import loglikelihoods, rolling_nll


@register_model("gptlab")
class GptlabLM(LM):
    def __init__(
        self, checkpoint: str, batch_size: int | str = 8, device: str = "cpu", max_gen_toks: int = 256
    ) -> None:
        super().__init__()
        loaded = load_model(checkpoint, device)
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.engine = Engine(self.model, self.tok)

    def _encode_context(self, text: str) -> list[int]:
        return prompt_ids(self.tok, text)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(self._encode_context(ctx), self.tok.encode(cont)) for ctx, cont in (r.args for r in requests)]
        return loglikelihoods(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        block = self.model.config.block_size
        return [
            -rolling_nll(self.model, [start_id(self.tok)] + self.tok.encode(text), block, self.batch_size)[0]
            for (text,) in (r.args for r in requests)
        ]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs: dict[str, Any] = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            completion = self.engine.generate(
                [context],
                int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                Sampling(temperature=0),
                stop=until,
                sliding_window=True,
            )[0]
            out.append(completion.text or "")
        return out
