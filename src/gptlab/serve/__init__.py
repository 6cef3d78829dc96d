"""Serving: continuous batching (:mod:`.scheduler`) behind an OpenAI-compatible HTTP API (:mod:`.app`), and
``gptlab serve`` (:mod:`.cli`). The HTTP parts need the ``serve`` extra (FastAPI, uvicorn, prometheus_client)."""

from .scheduler import Chunk, InvalidRequest, QueueFull, Request, Scheduler, TokenLogprob

__all__ = ["Chunk", "InvalidRequest", "QueueFull", "Request", "Scheduler", "TokenLogprob"]
