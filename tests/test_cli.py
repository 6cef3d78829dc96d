"""The command line: one-line errors with exit status 2, machine-readable --json, sampling against HF."""

import json
import math
import subprocess
import sys

import pytest

from .conftest import ENV, REPO


def gptlab(*args):
    return subprocess.run([sys.executable, "-m", "gptlab", *args], env=ENV, capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--data", "/nonexistent", "--out-dir", "/tmp/x"], "is not a prepared dataset"),
        (["train", "--recipe", "/nonexistent.toml"], "recipe /nonexistent.toml does not exist"),
        (["train", "--batch-size", "0"], "--batch-size: 0 is out of range (valid: >= 1)"),
        (["train", "--set", "n_heads=3"], "unknown model config field"),
        (["prepare", "/nonexistent.txt", "--out-dir", "/tmp/x"], "not a file, folder, URL or named corpus"),
        (["sample", "/nonexistent"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, needle):
    r = gptlab(*args)
    assert r.returncode == 2
    lines = [line.rsplit("\r", 1)[-1] for line in r.stderr.strip().splitlines()]  # what a terminal shows
    assert len(lines) == 1 and lines[0].startswith("gptlab: error: ") and needle in lines[0], r.stderr


def test_commands_start_without_importing_torchs_compiler():
    """gptlab's import and a model's skeleton (what loading a checkpoint builds first) leave ``torch._dynamo``
    unimported: 1.0 s of every command's start on an Intel Xeon. gptlab marks its CPU-capability answers as
    constants for ``torch.compile`` as ``torch.compiler.assume_constant_result`` does, without its import."""
    code = """
import sys
import gptlab.cli
from gptlab.checkpoint import skeleton
from gptlab.config import preset
model = skeleton(preset("gpt2"))
assert model.wte.weight.is_meta and "torch._dynamo" not in sys.modules
import torch
from gptlab import kernels
marked = kernels.constant_when_compiled(lambda: True)
assert vars(marked) == vars(torch.compiler.assume_constant_result(lambda: True)) != {}
assert kernels.has_avx512_kernels._dynamo_marked_constant and kernels.have_kernels._dynamo_marked_constant
"""
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_prepare_train_sample_round_trip_with_json(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 300)
    r = gptlab("prepare", str(corpus), "--out-dir", str(tmp_path / "d"), "--tokenizer", "char", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == len(corpus.read_text())
    r = gptlab(
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out-dir",
        str(tmp_path / "run"),
        "--model",
        "tiny",
        "--block-size",
        "32",
        "--max-iters",
        "40",
        "--eval-interval",
        "20",
        "--threads",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    # it learned: below the uniform guess over the corpus's characters (ln 17 = 2.83 nats here), where an
    # untrained model starts
    assert summary["steps"] == 40 and summary["final_val_loss"] < math.log(meta["vocab_size"]) - 0.5
    r = gptlab("sample", str(tmp_path / "run"), "--prompt", "to be", "--max-new-tokens", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["samples"]) == 1 and len(out["samples"][0]) == out["new_tokens"][0]  # one char per token
    assert out["new_tokens"][0] == 20 or out["finish_reasons"][0] == "stop_token"  # or it sampled end-of-text
    r = gptlab("eval", "exposure", str(tmp_path / "run"), "--text", "to be or not to be, that is", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tokens"] == 26 and rep["teacher_forcing_loss"] > 0


def test_every_training_option_is_documented():
    from gptlab.align.config import AlignConfig
    from gptlab.train.config import TrainConfig

    for cfg in (TrainConfig, AlignConfig):
        for f in cfg.fields():
            assert f.metadata.get("help"), f"{cfg.__name__}.{f.name} has no help text"
            numeric = isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
            assert not numeric or f.metadata.get("range"), f"{cfg.__name__}.{f.name} has no documented range"
    r = gptlab("train", "--help")
    assert r.returncode == 0 and "--ss-schedule" in r.stdout and "peak learning rate" in r.stdout
    assert "(valid: [0, 1); default 0.9)" in " ".join(r.stdout.split())  # --beta1


@pytest.mark.slow
def test_old_flags_still_work_for_one_release_with_a_warning(tmp_path):
    """--checkpoint, --out, --init, `gptlab exposure` and convert's positional output folder are deprecated
    aliases: each still works and prints one warning line naming the new spelling."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 200)
    r = gptlab("prepare", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", "char")
    assert r.returncode == 0 and "--out is deprecated" in r.stderr and "use --out-dir" in r.stderr
    r = gptlab(
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out-dir",
        str(tmp_path / "run"),
        "--model",
        "tiny",
        "--block-size",
        "16",
        "--max-iters",
        "4",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--threads",
        "1",
        "--final-eval-tokens",
        "64",
        "--device",
        "cpu",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    new = gptlab(
        "sample", str(tmp_path / "run"), "--prompt", "to", "--max-new-tokens", "5", "--temperature", "0", "--json"
    )
    old = gptlab(
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "to",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
    )
    assert new.returncode == old.returncode == 0 and "--checkpoint is deprecated" in old.stderr
    assert json.loads(new.stdout)["samples"] == json.loads(old.stdout)["samples"]
    (tmp_path / "t.txt").write_text("to be or not to be")
    new = gptlab("eval", "perplexity", str(tmp_path / "run"), str(tmp_path / "t.txt"), "--json")
    old = gptlab("eval", "perplexity", str(tmp_path / "t.txt"), "--checkpoint", str(tmp_path / "run"), "--json")
    assert new.returncode == old.returncode == 0, old.stderr
    assert json.loads(new.stdout)["nll"] == json.loads(old.stdout)["nll"]
    r = gptlab("exposure", "--checkpoint", str(tmp_path / "run"), "--text", "to be or not", "--json")
    assert r.returncode == 0 and "`gptlab exposure` is deprecated" in r.stderr
    r = gptlab("convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert r.returncode == 0 and "positional output folder is deprecated" in r.stderr and (tmp_path / "hf").is_dir()
    r = gptlab("sample", str(tmp_path / "run"), "--checkpoint", str(tmp_path / "d"))
    assert r.returncode == 2 and "contradicts" in r.stderr


def test_defaults_come_from_the_library():
    from gptlab.generate import Sampling

    r = gptlab("sample", "--help")
    text = " ".join(r.stdout.split())
    assert f"default {Sampling().temperature:g})" in text and f"default {Sampling().seed})" in text
    assert "--device" in text and "(default auto)" in text
