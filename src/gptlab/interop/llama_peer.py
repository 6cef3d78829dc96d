"""llama.cpp (through ``llama-cpp-python``) as a peer for tests and benchmarks, opened so that it cannot crash the
process that compares against it.

On CPUs with AMX (Intel Sapphire Rapids and later), llama-cpp-python 0.3.36 built for the machine segfaults when it
multiplies quantized weights (Q4_1, Q8_0) by a batch of more than one token: in ggml's AMX "extra buffer" kernels
(``use_extra_bufts=False`` avoids those) and, measured on such a Xeon, still in the plain CPU path for a prompt of
several tokens. Batch-1 decoding and f32 weights are unaffected. :func:`open_llama` therefore asks a throwaway
subprocess to evaluate a 4-token batch with the model first; if that process dies, the model is opened with
micro-batches of one token (``n_ubatch=1``: prompts are evaluated a token at a time, with the same results).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

PROBE = (
    "import sys, llama_cpp\n"
    "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, verbose=False, use_extra_bufts=False)\n"
    "llm.eval([1, 2, 3, 4])\n"
)


@functools.cache
def batches_crash(path: str) -> bool:
    """Whether llama.cpp dies evaluating a batch of tokens with the model at ``path`` on this machine."""
    r = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, timeout=300)
    return r.returncode != 0


def open_llama(path: str, **kw: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, verbose=False, use_extra_bufts=False, **kw)``, with ``n_ubatch=1`` where
    a batch would crash (see the module docstring; :func:`batches_crash` says whether it does)."""
    import llama_cpp

    if batches_crash(path):
        kw["n_ubatch"] = 1
    return llama_cpp.Llama(model_path=path, verbose=False, use_extra_bufts=False, **kw)
