"""Shared fixtures and helpers: the repository and a subprocess environment, the synthetic corpus and the tiny
training config most tests train on, a prepared character-level dataset, and the HF/gptlab model pairs."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.data.prepare import prepare
from gptlab.metrics import read_rows
from gptlab.model import GPT
from gptlab.train.config import TrainConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_file(rel: str) -> Path:
    """A file from ../shared, or skip the test saying why (the product never needs ../shared)."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is absent (../shared is only beside developer and CI checkouts)")
    return p


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _offline_tiktoken():
    cache = SHARED / "tiktoken-cache"
    if cache.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def synthetic_text(n_sentences=6000, seed=0):
    """Sentences from a fixed word list: far more structure than unigram character frequencies."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "king",
        "queen",
        "doth",
        "speak",
        "of",
        "love",
        "and",
        "war",
        "my",
        "lord",
        "good",
        "night",
        "sweet",
        "prince",
        "what",
        "say",
        "you",
        "thou",
        "art",
        "noble",
        "fair",
        "heaven",
        "blood",
    ]
    return "\n".join(
        " ".join(rng.choice(words, rng.integers(3, 9))) + rng.choice([".", "!", "?"]) for _ in range(n_sentences)
    )


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(synthetic_text())
    prepare([str(root / "corpus.txt")], root / "char", tokenizer="char", progress=False)
    return root / "char"


def tiny_cfg(data, out, **kw):
    base = dict(
        data=str(data),
        out_dir=str(out),
        model="tiny",
        block_size=32,
        batch_size=8,
        max_iters=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup_iters=5,
        eval_interval=30,
        eval_iters=4,
        log_interval=1,
        checkpoint_interval=30,
        device="cpu",
        threads=1,
        final_eval_tokens=20_000,
    )
    base.update(kw)
    return TrainConfig.from_sources(None, **base)  # optimizer fields flat, as flags give them


def losses(run_dir):
    """(step, training loss) rows of a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_rows(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def kill_once_written(cmd, target: Path) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``target`` exists (a checkpoint it writes); fail if it finished first."""
    import signal

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def gpt2_shaped(**kw):
    """A small random GPT with GPT-2's vocabulary (seed 0); ``kw`` replaces config fields."""
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=50257, init_std=0.1)
    return GPT(GPTConfig(**{**base, **kw})).eval()


def run_cli(*args, env=None, stdin=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "gptlab", *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        cwd=REPO,
        input=stdin,
        timeout=timeout,  # a command that hangs fails its test instead of stalling the suite
    )


def torchrun(*args, nproc: int = 2, timeout: float = 600, env=None):
    """``torchrun --standalone --nproc_per_node NPROC -m gptlab ARGS``, as a user runs it, captured."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "gptlab",
         *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )  # fmt: skip


def why(done: subprocess.CompletedProcess) -> str:
    """A failed command's reason for its assertion: its ``gptlab: error`` lines and exception lines first (under
    torchrun a rank's error is far above torchrun's own summary, which fills the end), then the end of stderr."""
    lines = [x for x in done.stderr.splitlines() if "gptlab: error" in x or re.match(r"\w*(Error|Exception)\b", x)]
    return "\n".join(lines[:20]) + "\n...\n" + done.stderr[-3000:]


def hf_pair(cfg: GPTConfig):
    """A random-weight HF model and a gptlab model holding the same weights.

    HF's GPT-1 ``afn="gelu"`` is the tanh approximation (gptlab's ``gelu_new``); HF's GPT-2
    ``activation_function="gelu"`` is the exact erf GELU, so both gptlab activations are checked."""
    transformers = pytest.importorskip("transformers")
    from gptlab.interop.hf import from_hf_state_dict

    if cfg.norm == "post":
        hf = transformers.OpenAIGPTLMHeadModel(
            transformers.OpenAIGPTConfig(
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                n_positions=cfg.block_size,
                vocab_size=cfg.vocab_size,
                afn="gelu",
                resid_pdrop=0,
                embd_pdrop=0,
                attn_pdrop=0,
            )
        )
    else:
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                n_positions=cfg.block_size,
                vocab_size=cfg.vocab_size,
                activation_function=cfg.activation,
                resid_pdrop=0,
                embd_pdrop=0,
                attn_pdrop=0,
                tie_word_embeddings=cfg.tie_weights,
            )
        )
    hf.eval()
    with torch.no_grad():  # HF's init is tiny; perturb every weight so LayerNorms and biases matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return hf, ours


def random_gpt2_checkpoint(path: Path, block_size: int) -> Path:
    """A small random-weight GPT with GPT-2's tokenizer (byte-level BPE: multi-byte characters split across
    tokens), saved as a gptlab checkpoint."""
    from gptlab.checkpoint import save_model_checkpoint

    model = gpt2_shaped(block_size=block_size)
    save_model_checkpoint(path, model.state_dict(), model.config, {"kind": "gpt2"})
    return path


LM_EVAL_TASKS = {  # lm-eval task definitions over a local JSON-lines file (nothing is downloaded)
    "lambada": (  # lm-eval's lambada_openai: the passage up to its last word, then " " + that word
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n"
    ),
    "mc": (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    ),
    "ppl": (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    ),
    "qa": (  # double-quoted YAML, so that \\n is a newline in the prompt and the stop string
        'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n'
    ),
}


def lm_eval_tasks(folder: Path, **rows: list[dict]):
    """For each ``name=rows``: ``folder/name.jsonl`` and the lm-eval task ``gl_<name>`` over it
    (:data:`LM_EVAL_TASKS`); returns lm-eval's TaskManager that finds them."""
    from lm_eval.tasks import TaskManager

    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    for name, records in rows.items():
        data = folder / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in records))
        (folder / "tasks" / f"{name}.yaml").write_text(
            f"task: gl_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n" + LM_EVAL_TASKS[name]
        )
    return TaskManager(include_path=str(folder / "tasks"))


def assert_lambada_equals_lm_eval(out: dict, model, tok, path: Path, tol: float) -> None:
    """lm-eval's ``gl_lambada`` result ``out`` (with ``log_samples``) against gptlab's scoring of ``model``: each
    example's log-likelihood (within ``tol``) and greedy flag, then accuracy and perplexity."""
    from gptlab.eval.scoring import loglikelihoods
    from gptlab.eval.tasks import lambada

    for sample in out["samples"]["gl_lambada"]:
        ctx, word = sample["doc"]["text"].rsplit(" ", 1)
        ll, greedy = loglikelihoods(model, [(tok.encode(ctx), tok.encode(" " + word))])[0]
        theirs_ll, theirs_greedy = sample["resps"][0][0]
        assert ll == pytest.approx(float(theirs_ll), abs=tol) and greedy == bool(theirs_greedy)
    ours = lambada(model, tok, path=str(path))
    assert ours["acc"] == pytest.approx(out["results"]["gl_lambada"]["acc,none"])
    assert ours["perplexity"] == pytest.approx(out["results"]["gl_lambada"]["perplexity,none"], rel=1e-4)


def prometheus(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, by name with labels: ``{'a_total{x="y"}': 1.0}``."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Served:
    """A real ``gptlab serve`` subprocess on 127.0.0.1 (a free port), its URL, metrics and memory."""

    def __init__(self, ckpt, *flags):
        env = {**ENV, "OMP_NUM_THREADS": "2", **{k: v for k, v in os.environ.items() if k == "TIKTOKEN_CACHE_DIR"}}
        eager = () if "--compile" in flags else ("--no-compile",)  # unless asked: compiling takes seconds a start
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptlab", "serve", str(ckpt), "--port", "0", "--device", "cpu", *eager, *flags],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
        else:
            self.stop()
            raise RuntimeError("server did not start")
        if not hasattr(self, "url"):
            raise RuntimeError("server did not start: " + "".join(self.lines))
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stderr], daemon=True).start()

    def client(self, **kw):
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw
        )

    def metrics(self):
        import httpx

        return prometheus(httpx.get(self.url + "/metrics").text)

    def rss_mb(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
