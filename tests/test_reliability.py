"""A careless user across every verb: each bad input is one line ``gptlab: error: ...``, exit 2, no traceback, no
output on stdout, and nothing created or changed anywhere (the cases run in a sandbox folder that is compared file by
file before and after). Numeric ranges are also probed with hypothesis-generated values."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.cli import main
from gptlab.data.prepare import prepare
from gptlab.errors import GptlabError
from gptlab.recipe import Range
from gptlab.train.config import TrainConfig
from gptlab.train.trainer import train

from .conftest import synthetic_text, tiny_cfg

TEXT = synthetic_text(400)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Everything the cases read: a corpus, a dataset, a trained run, a Hugging Face export, and broken files."""
    root = tmp_path_factory.mktemp("sandbox")
    (root / "corpus.txt").write_text(TEXT)
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text(TEXT)
    prepare([str(root / "corpus.txt")], root / "data", tokenizer="char", progress=False)
    train(
        tiny_cfg(
            root / "data",
            root / "run",
            max_iters=4,
            checkpoint_interval=4,
            eval_interval=4,
            eval_iters=1,
            final_eval_tokens=512,
        ),
        progress=False,
    )
    assert main(["convert", str(root / "run"), str(root / "hf")]) == 0
    (root / "mine").mkdir()
    (root / "mine" / "notes.md").write_text("my own notes\n")
    (root / "file.txt").write_text("a plain file\n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "recipe_dir").mkdir()
    (root / "latin1.toml").write_bytes("model = 'b\xe9b\xe9'\n".encode("latin-1"))
    (root / "bad.toml").write_text("lr = = 1\n")
    (root / "unknown.toml").write_text("learning_rate = 1\n")
    (root / "wrongtype.toml").write_text("max_iters = 'many'\n")
    (root / "sweep_bad.toml").write_text("depths = 'abc'\n")
    for name, lines in {
        "array.jsonl": ["[1, 2, 3]"],
        "number.jsonl": ["42"],
        "string.jsonl": ['"text"'],
        "broken.jsonl": [
            '{"text": "a"',
        ],
        "nofield.jsonl": ['{"body": "x"}'],
        "same.jsonl": [json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " yes"})],
        "prefs.jsonl": [json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " no"})] * 4,
        "chats.jsonl": [json.dumps({"prompt": "Q:", "response": " yes"})] * 4,
        "mc_bad.jsonl": [json.dumps({"context": "a", "choices": "b", "label": 0})],
    }.items():
        (root / name).write_text("\n".join(lines) + "\n")
    checkpoint_dir = sorted((root / "run" / "checkpoints").glob("step-*"))[-1]
    state = json.loads((checkpoint_dir / "state.json").read_text())
    damaged = {
        "no_sha": {k: v for k, v in state.items() if k != "sha256"},
        "no_config": {k: v for k, v in state.items() if k != "model_config"},
        "bad_config": {**state, "model_config": {**state["model_config"], "n_head": 3}},
        "wrong_format": {**state, "format": "other"},
        "text_step": {**state, "step": "x"},
        "chars_number": {**state, "tokenizer": {"kind": "char", "chars": 5}},
        "bpe_broken": {**state, "tokenizer": {"kind": "bpe", "tokenizer_json": "{x"}},
    }
    for name, st_ in damaged.items():
        shutil.copytree(checkpoint_dir, root / f"ck_{name}")
        (root / f"ck_{name}" / "state.json").write_text(json.dumps(st_))
    shutil.copytree(checkpoint_dir, root / "ck_notjson")
    (root / "ck_notjson" / "state.json").write_text("{not json")
    shutil.copytree(checkpoint_dir, root / "ck_truncated")
    w = root / "ck_truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    hf_cfg = json.loads((root / "hf" / "config.json").read_text())
    for name, change in {
        "no_nlayer": lambda c: c.pop("n_layer"),
        "relu": lambda c: c.update(activation_function="relu"),
        "llama": lambda c: c.update(model_type="llama"),
        "mamba": lambda c: c.update(model_type="mamba"),
    }.items():
        shutil.copytree(root / "hf", root / f"hf_{name}")
        c = dict(hf_cfg)
        change(c)
        (root / f"hf_{name}" / "config.json").write_text(json.dumps(c))
    shutil.copytree(root / "hf", root / "hf_list_config")
    (root / "hf_list_config" / "config.json").write_text("[1, 2]")
    shutil.copytree(root / "hf", root / "hf_index")
    (root / "hf_index" / "model.safetensors").rename(root / "hf_index" / "model-00001.safetensors")
    (root / "hf_index" / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    # a folder of the user's own files named like a run's, and a link to it; a dataset someone trained into
    (root / "mine_run").mkdir()
    (root / "mine_run" / "metrics.jsonl").write_text('{"my": "own numbers"}\n')
    (root / "mine_run" / "loss.png").write_bytes(b"my own picture")
    (root / "mine_link").symlink_to(root / "mine_run")
    shutil.copytree(root / "data", root / "data_with_run")
    (root / "data_with_run" / "checkpoints").mkdir()
    (root / "data_with_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    shutil.copytree(root / "data", root / "data_nokey")
    meta = json.loads((root / "data" / "meta.json").read_text())
    (root / "data_nokey" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "vocab_size"}))
    (root / "x.parquet").write_text("not parquet at all\n")
    # quantized checkpoints with a damaged record or tensor
    assert main(["quantize", str(root / "run"), "--mode", "int8", "--out-dir", str(root / "q8")]) == 0
    q_state = json.loads((root / "q8" / "state.json").read_text())
    for name, record in {
        "q_badmode": {"mode": 5},
        "q_string": "int8",
        "q_group": {"mode": "int4", "group_size": "x"},
    }.items():
        shutil.copytree(root / "q8", root / name)
        (root / name / "state.json").write_text(json.dumps({**q_state, "quantization": record}))
    shutil.copytree(root / "q8", root / "q_dtype")
    from safetensors.torch import load_file, save_file

    weights = load_file(root / "q8" / "model.safetensors")
    codes = next(k for k, v in weights.items() if v.dtype == torch.int8)
    save_file({**weights, codes: weights[codes].float()}, root / "q_dtype" / "model.safetensors")
    digest = hashlib.sha256((root / "q_dtype" / "model.safetensors").read_bytes()).hexdigest()
    (root / "q_dtype" / "state.json").write_text(json.dumps({**q_state, "sha256": {"model.safetensors": digest}}))
    for name, record in {
        "lambada_int.jsonl": {"text": 5},
        "sft_msgs.jsonl": {"messages": 5},
        "sft_msgs_list.jsonl": {"messages": [5]},
        "dpo_prompt.jsonl": {"prompt": 5, "chosen": "a", "rejected": "b"},
        "fewshot_label.jsonl": {"text": "x", "label": [1]},
        "qa_numbers.jsonl": {"question": "q", "answers": [1]},
        "qa_none.jsonl": {"question": "q", "answers": []},
    }.items():
        (root / name).write_text(json.dumps(record) + "\n")
    shutil.copytree(root / "hf", root / "hf_tokjson")
    for f in ("vocab.json", "merges.txt"):
        (root / "hf_tokjson" / f).unlink(missing_ok=True)
    (root / "hf_tokjson" / "tokenizer.json").write_text("{broken")
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def assert_one_line_error(argv, capsys, root, needle=""):
    before = snapshot(root)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    lines = [seg for line in err.splitlines() for seg in [line.rsplit("\r", 1)[-1]] if seg.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and lines[0].startswith("gptlab: error: "), (argv, err)
    assert "Traceback" not in err and out == "", (argv, out, err)
    assert needle in lines[0], (argv, needle, lines[0])
    assert snapshot(root) == before, f"{argv} changed files in the sandbox"
    return lines[0]


R = "{root}"
RUN, DATA, HF = f"{R}/run", f"{R}/data", f"{R}/hf"
TRAIN = ["train", "--data", DATA, "--out-dir", f"{R}/new_run", "--model", "tiny", "--max-iters", "2", "--device", "cpu"]
SAMPLE = ["sample", RUN, "--max-new-tokens", "2"]
PLAN_TRAIN = ["plan", "train", "gpt2", "--tokens", "1B"]

CASES = [
    # prepare: the output folder and the inputs
    (["prepare", "--out-dir", f"{R}/x"], "the following arguments are required: sources"),
    (["prepare", f"{R}/missing.txt", "--out-dir", f"{R}/x"], "not a file, folder, URL or named corpus"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/file.txt", "--tokenizer", "char"], "is not a folder"),
    (["prepare", f"{R}/file.txt", "--out-dir", f"{R}/file.txt", "--tokenizer", "char"], "overlaps the source"),
    (["prepare", f"{R}/texts", "--out-dir", f"{R}/texts", "--tokenizer", "char"], "overlaps the source"),
    (["prepare", f"{R}/texts", "--out-dir", f"{R}/texts/out", "--tokenizer", "char"], "overlaps the source"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/mine", "--tokenizer", "char"], "not a gptlab dataset"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/run", "--tokenizer", "char"], "not a gptlab dataset"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}", "--tokenizer", "char"], "overlaps the source"),
    (["prepare", f"{R}/binary.txt", "--out-dir", f"{R}/x", "--tokenizer", "char"], "looks binary"),
    (["prepare", f"{R}/latin1.txt", "--out-dir", f"{R}/x", "--tokenizer", "char"], "not valid UTF-8"),
    (["prepare", f"{R}/empty.txt", "--out-dir", f"{R}/x", "--tokenizer", "char"], "sources are empty"),
    (["prepare", f"{R}/array.jsonl", "--out-dir", f"{R}/x", "--tokenizer", "char"], "no string field 'text'"),
    (["prepare", f"{R}/number.jsonl", "--out-dir", f"{R}/x", "--tokenizer", "char"], "no string field 'text'"),
    (["prepare", f"{R}/string.jsonl", "--out-dir", f"{R}/x", "--tokenizer", "char"], "no string field 'text'"),
    (["prepare", f"{R}/broken.jsonl", "--out-dir", f"{R}/x", "--tokenizer", "char"], "is not valid JSON"),
    (["prepare", f"{R}/nofield.jsonl", "--out-dir", f"{R}/x", "--tokenizer", "char"], "choose the field with --field"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/x", "--tokenizer", "bpe"], "needs --vocab-size"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/x", "--tokenizer", "sentencepiece"], "invalid choice"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", "/proc/gptlab/x", "--tokenizer", "char"], "/proc/gptlab"),
    *[
        (
            ["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/x", "--tokenizer", "char", "--val-fraction", v],
            "--val-fraction",
        )
        for v in ("0", "1", "-0.1", "1.5", "nan", "abc", "inf")
    ],
    *[
        (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/x", "--tokenizer", "bpe", "--vocab-size", v], "--vocab-size")
        for v in ("0", "1", "-5", "x", "2.5")
    ],
    # train: recipes
    (["train", "--recipe", f"{R}/missing.toml"], "does not exist"),
    (["train", "--recipe", f"{R}/recipe_dir"], "is not a file"),
    (["train", "--recipe", f"{R}/latin1.toml"], "is not UTF-8"),
    (["train", "--recipe", f"{R}/bad.toml"], "is not valid TOML"),
    (["train", "--recipe", f"{R}/unknown.toml"], "unknown option(s) ['learning_rate']"),
    (["train", "--recipe", f"{R}/wrongtype.toml", "--data", DATA], "should be of type int"),
    # train: data, folders, devices, models
    (["train", "--data", f"{R}/missing", "--out-dir", f"{R}/new_run"], "is not a prepared dataset"),
    (["train", "--data", f"{R}/mine", "--out-dir", f"{R}/new_run"], "is not a prepared dataset"),
    (TRAIN + ["--model", "gpt5"], "unknown model preset"),
    (TRAIN + ["--device", "bogus"], "is not a device"),
    (TRAIN + ["--device", "cuda"], "CUDA is not available"),
    (TRAIN + ["--device", "cuda:7"], "CUDA is not available"),
    (TRAIN + ["--device", "cpu:1"], "is not a device"),
    (TRAIN + ["--device", "mps"], "MPS is not available"),
    (["train", "--data", DATA, "--out-dir", RUN, "--model", "tiny", "--max-iters", "2"], "already holds checkpoints"),
    (TRAIN + ["--resume"], "holds no complete checkpoint"),
    (["train", "--data", DATA, "--out-dir", f"{R}/file.txt", "--model", "tiny"], "is a file"),
    (TRAIN + ["--out-dir", "/proc/gptlab/run"], "/proc/gptlab"),
    (TRAIN + ["--block-size", "100000"], "fewer than one window"),
    (TRAIN + ["--min-lr", "0.5", "--lr", "0.1"], "min_lr = 0.5 must not exceed lr"),
    (TRAIN + ["--ss-schedule", "exponential"], "ss_k must be < 1"),
    *[(TRAIN + [flag, "bogus"], "invalid choice") for flag in ("--schedule", "--dtype", "--parallel", "--ss-schedule")],
    *[
        (TRAIN + [flag, v], flag)
        for flag, v in [
            ("--batch-size", "0"),
            ("--batch-size", "-3"),
            ("--batch-size", "1.5"),
            ("--grad-accum", "0"),
            ("--max-iters", "0"),
            ("--lr", "0"),
            ("--lr", "-1"),
            ("--lr", "nan"),
            ("--lr", "inf"),
            ("--lr", "1e4"),
            ("--min-lr", "-1"),
            ("--warmup-iters", "-1"),
            ("--lr-decay-iters", "-1"),
            ("--decay-frac", "0"),
            ("--decay-frac", "2"),
            ("--weight-decay", "-1"),
            ("--beta1", "2"),
            ("--beta1", "-0.1"),
            ("--beta2", "1"),
            ("--grad-clip", "-1"),
            ("--dropout", "1"),
            ("--dropout", "-0.5"),
            ("--eval-interval", "0"),
            ("--eval-iters", "0"),
            ("--final-eval-tokens", "-1"),
            ("--log-interval", "0"),
            ("--checkpoint-interval", "-1"),
            ("--keep-last", "0"),
            ("--seed", "-1"),
            ("--threads", "-1"),
            ("--threads", "100000"),
            ("--ss-max-prob", "2"),
            ("--ss-k", "0"),
            ("--block-size", "-1"),
            ("--max-iters", "ten"),
        ]
    ],
    *[
        (TRAIN + ["--set", s], needle)
        for s, needle in [
            ("vocab_size=10", "smaller than the dataset's tokenizer vocabulary"),
            ("layer_norm_eps=-1", "layer_norm_eps"),
            ("layer_norm_eps=0", "layer_norm_eps"),
            ("init_std=-0.1", "init_std"),
            ("n_heads=3", "unknown model config"),
            ("n_head=3", "not divisible"),
            ("dropout=2", "dropout"),
            ("norm=mid", "norm = 'mid' is not one of pre|post"),
            ("activation=relu", "activation = 'relu' is not one of gelu_new|gelu"),
            ("n_layer=0", "n_layer = 0 is out of range (valid: >= 1)"),
            ("n_layer=x", "n_layer = 'x' should be of type int"),
            ("n_layer=2.5", "n_layer = 2.5 should be of type int"),
            ("bias=3", "bias = 3 should be of type bool"),
            ("novalue", "expected key=value"),
            ("experts_per_token=3", "exceeds"),
            ("capacity_factor=-1", "capacity_factor"),
            ("aux_loss_weight=NaN", "aux_loss_weight"),
            ("block_size=0", "block_size = 0 is out of range (valid: >= 1)"),
        ]
    ],
    # sample
    (["sample", f"{R}/missing"], "does not exist"),
    (["sample", f"{R}/mine"], "is not a gptlab run or checkpoint"),
    (["sample", DATA], "is not a gptlab run or checkpoint"),
    (["sample"], "the model is required: gptlab sample MODEL"),
    (SAMPLE + ["--prompt", "a", "--prompt-file", f"{R}/file.txt"], "not both"),
    (SAMPLE + ["--prompt-file", f"{R}/missing.txt"], "cannot read --prompt-file"),
    (SAMPLE + ["--prompt-file", f"{R}/recipe_dir"], "--prompt-file"),
    (SAMPLE + ["--stream", "--json"], "pick one"),
    (SAMPLE + ["--device", "bogus"], "is not a device"),
    (SAMPLE + ["--prompt", "the king " * 10, "--max-new-tokens", "200"], "context"),
    *[
        (SAMPLE + [flag, v], flag)
        for flag, v in [
            ("--max-new-tokens", "0"),
            ("--max-new-tokens", "-1"),
            ("--temperature", "-1"),
            ("--temperature", "nan"),
            ("--temperature", "101"),
            ("--top-k", "-1"),
            ("--top-p", "0"),
            ("--top-p", "1.5"),
            ("--min-p", "2"),
            ("--min-p", "-0.1"),
            ("--repetition-penalty", "0"),
            ("--num-samples", "0"),
            ("--num-samples", "100000"),
            ("--seed", "-1"),
            ("--seed", "1.5"),
        ]
    ],
    (SAMPLE + ["--num-samples", "0", "--stream"], "--num-samples"),
    # convert: damaged checkpoints and Hugging Face folders
    (["convert", f"{R}/missing", "--out-dir", f"{R}/out"], "does not exist"),
    (["convert", RUN, "--out-dir", HF], "already exists"),
    (["convert", f"{R}/ck_no_sha", "--out-dir", f"{R}/out"], "lacks sha256"),
    (["convert", f"{R}/ck_no_config", "--out-dir", f"{R}/out"], "lacks model_config"),
    (["convert", f"{R}/ck_bad_config", "--out-dir", f"{R}/out"], "invalid model_config"),
    (["convert", f"{R}/ck_wrong_format", "--out-dir", f"{R}/out"], "is not a gptlab v1 checkpoint"),
    ([*SAMPLE[:1], f"{R}/ck_text_step", *SAMPLE[2:]], "lacks an integer step"),
    ([*SAMPLE[:1], f"{R}/ck_chars_number", *SAMPLE[2:]], "tokenizer's 'chars' is missing or of the wrong type"),
    ([*SAMPLE[:1], f"{R}/ck_bpe_broken", *SAMPLE[2:]], "the saved bpe tokenizer cannot be read"),
    (["convert", f"{R}/ck_notjson", "--out-dir", f"{R}/out"], "missing or corrupt"),
    (["convert", f"{R}/ck_truncated", "--out-dir", f"{R}/out"], "corrupt"),
    (["convert", f"{R}/hf_no_nlayer", "--out-dir", f"{R}/out"], "lacks ['n_layer']"),
    (["convert", f"{R}/hf_relu", "--out-dir", f"{R}/out"], "unsupported activation 'relu'"),
    (["convert", f"{R}/hf_llama", "--out-dir", f"{R}/out"], "it is not a complete llama config"),
    (["convert", f"{R}/hf_mamba", "--out-dir", f"{R}/out"], "model_type 'mamba' is not supported"),
    (["convert", f"{R}/hf_list_config", "--out-dir", f"{R}/out"], "is not a JSON object"),
    (["convert", f"{R}/hf_index", "--out-dir", f"{R}/out"], "is damaged"),
    (["convert", f"{R}/hf_tokjson", "--out-dir", f"{R}/out"], "tokenizer.json cannot be read"),
    (["convert", RUN, "--out-dir", f"{R}/out", "--to", "onnx"], "invalid choice"),
    (["convert", RUN, "--out-dir", "/proc/gptlab/out"], "/proc/gptlab"),
    # exposure
    (["eval", "exposure", RUN, "--text-file", f"{R}/missing.txt"], "No such file or directory"),
    (["eval", "exposure", RUN], "give a text"),
    (["eval", "exposure", RUN, "--text", "a"], "shorter than two tokens"),
    (["eval", "exposure", RUN, "--text", "the king", "--p", "2"], "--p"),
    (["eval", "exposure", RUN, "--text", "the king", "--p", "-1"], "--p"),
    (["eval", "exposure", RUN, "--text", "the king", "--seed", "-4"], "--seed"),
    # eval
    (["eval", "perplexity", RUN, f"{R}/missing.txt"], "missing.txt"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--stride", "0"], "--stride"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--stride", "100000"], "--stride must be in"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--limit", "0"], "--limit"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--limit", "-1"], "--limit"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--batch-size", "0"], "--batch-size"),
    (["eval", "perplexity", RUN, f"{R}/corpus.txt", "--device", "cuda"], "CUDA is not available"),
    (["eval", "lambada", RUN, "--path", f"{R}/missing.jsonl"], "missing.jsonl"),
    (["eval", "lambada", RUN, "--path", f"{R}/array.jsonl"], "not a JSON object"),
    (["eval", "lambada", RUN, "--path", f"{R}/number.jsonl"], "not a JSON object"),
    (["eval", "lambada", RUN, "--path", f"{R}/broken.jsonl"], "is not valid JSON"),
    (["eval", "mc", RUN, f"{R}/number.jsonl"], "line 1"),
    (["eval", "mc", RUN, f"{R}/mc_bad.jsonl"], "field 'choices' is str, not a list"),
    (["eval", "fewshot", RUN, "--shots", "-1"], "--shots"),
    (["eval", "fewshot", RUN, "--shots", "a,b"], "--shots"),
    (["eval", "fewshot", RUN, "--shots", ","], "--shots"),
    (["eval", "fewshot", RUN, "--seed", "-1"], "--seed"),
    (["eval", "fewshot", RUN, "--path", f"{R}/string.jsonl"], "not a JSON object"),
    (["eval", "generate", RUN, "poetry", f"{R}/chats.jsonl"], "invalid choice"),
    (["eval", "generate", RUN, "qa", f"{R}/chats.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "generate", RUN, "qa", f"{R}/chats.jsonl", "--shots", "-2"], "--shots"),
    (["eval", "bogus"], "invalid choice"),
    # plan
    (["plan", "model", "gpt5"], "unknown model preset"),
    (["plan", "model", "gpt2", "--set", "n_head=5"], "not divisible"),
    (["plan", "model", "gpt2", "--set", "n_ctx=-1"], "n_ctx must be a positive integer"),
    (["plan", "model", "gpt2", "--set", "d_ff=0"], "d_ff must be a positive integer"),
    (["plan", "model", "gpt2", "--set", "bias=3"], "bias must be true or false"),
    (["plan", "model", "gpt2", "--set", "norm=mid"], "norm must be pre or post"),
    (["plan", "model", "gpt2", "--set", "depth=3"], "unknown shape field"),
    *[
        (PLAN_TRAIN + [flag, v], flag)
        for flag, v in [
            ("--tokens", "-1"),
            ("--tokens", "0"),
            ("--tokens", "nan"),
            ("--tokens", "1Q"),
            ("--devices", "0"),
            ("--mfu", "0"),
            ("--mfu", "2"),
            ("--mfu", "-0.5"),
            ("--price", "-1"),
            ("--micro-batch", "0"),
            ("--dp", "0"),
            ("--tp", "0"),
            ("--pp", "-1"),
            ("--seq-len", "0"),
            ("--batch-tokens", "0"),
            ("--peak-tflops", "-1"),
            ("--bandwidth-gbs", "0"),
            ("--memory-gib", "-1"),
            ("--zero", "4"),
        ]
    ],
    *[
        (["plan", "infer", "gpt2", flag, v], flag)
        for flag, v in [
            ("--batch", "0"),
            ("--context", "0"),
            ("--devices", "0"),
            ("--prompt-tokens", "0"),
            ("--batch", "-2"),
        ]
    ],
    (["plan", "scaling"], "give a budget"),
    (["plan", "scaling", "--compute", "-1"], "--compute"),
    (["plan", "scaling", "--compare", "gpt3"], "expected NAME=PARAMS:TOKENS"),
    (["plan", "scaling", "--compare", "x=-1:1"], "expected NAME=PARAMS:TOKENS"),
    (["plan", "scaling", "--compute", "1e20", "--law", f"{R}/missing.json"], "missing.json"),
    (["plan", "attention", "gpt2", "--contexts", "0"], "--contexts"),
    (["plan", "attention", "gpt2", "--contexts", "a"], "--contexts"),
    (["plan", "mfu", "gpt2", "--tokens-per-second", "-1"], "--tokens-per-second"),
    (["plan", "mfu", "gpt2", "--tokens-per-second", "1e5", "--devices", "0"], "--devices"),
    (["plan", "mfu", "gpt2", "--tokens-per-second", "1e12", "--hardware", "a100"], "above the hardware's peak"),
    (["plan", "compare", "--mfu", "2"], "--mfu"),
    (["plan", "compare", "--tokens", "-5"], "--tokens"),
    (["plan", "compare", "gpt5"], "unknown model preset"),
    # scale
    (["scale", "--out-dir", f"{R}/sweep"], "needs `data`"),
    (["scale", "--data", DATA], "needs `out_dir`"),
    (["scale", "--sweep", f"{R}/missing.toml"], "does not exist"),
    (["scale", "--sweep", f"{R}/bad.toml"], "is not valid TOML"),
    (["scale", "--sweep", f"{R}/sweep_bad.toml", "--data", DATA, "--out-dir", f"{R}/sweep"], "must be lists"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--depths", "1,1,1"], "at least 3 distinct"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--depths", "1,2"], "at least 3 distinct"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--tokens", "-1"], "--tokens"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--jobs", "0"], "--jobs"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--warmup-frac", "1"], "--warmup-frac"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--launcher", "slurm"], "invalid choice"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--shapes", "2x"], "--shapes"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--width-per-layer", "0"], "--width-per-layer"),
    (["scale", "--data", DATA, "--out-dir", f"{R}/sweep", "--tokens", "1e2"], "give at least"),
    # align
    (["align", "sft", RUN, "--out-dir", f"{R}/a"], "data (a JSON-lines file) is required"),
    (["align", "sft", "--data", f"{R}/chats.jsonl", "--out-dir", f"{R}/a"], "the model to start from"),
    (["align", "ppo", RUN, "--data", f"{R}/chats.jsonl", "--out-dir", f"{R}/a"], "needs reward_model"),
    (
        ["align", "dpo", RUN, "--data", f"{R}/same.jsonl", "--out-dir", f"{R}/a", "--device", "cpu"],
        "two of its responses are identical",
    ),
    (
        ["align", "reward", RUN, "--data", f"{R}/same.jsonl", "--out-dir", f"{R}/a", "--device", "cpu"],
        "two of its responses are identical",
    ),
    (["align", "sft", RUN, "--data", f"{R}/number.jsonl", "--out-dir", f"{R}/a", "--device", "cpu"], "line 1"),
    (
        ["align", "sft", f"{R}/missing", "--data", f"{R}/chats.jsonl", "--out-dir", f"{R}/a", "--device", "cpu"],
        "does not exist",
    ),
    (["align", "sft", RUN, "--data", f"{R}/chats.jsonl", "--out-dir", f"{R}/a", "--device", "tpu"], "is not a device"),
    (["align", "sft", "--recipe", f"{R}/latin1.toml"], "is not UTF-8"),
    (["align", "finetune", RUN, "--data", f"{R}/chats.jsonl", "--task", "poetry"], "invalid choice"),
    *[
        (["align", "dpo", RUN, "--data", f"{R}/prefs.jsonl", "--out-dir", f"{R}/a", flag, v], flag)
        for flag, v in [
            ("--lr", "0"),
            ("--beta", "0"),
            ("--beta", "-1"),
            ("--gamma", "0"),
            ("--lam", "2"),
            ("--val-frac", "1"),
            ("--temperature", "0"),
            ("--batch-size", "0"),
            ("--clip", "0"),
            ("--kl-coef", "-1"),
            ("--ppo-epochs", "0"),
            ("--weight-decay", "-0.1"),
            ("--beta2", "1"),
        ]
    ],
    # a run folder must be new, empty or a gptlab run; a dataset is replaced only when it holds nothing else
    ([*TRAIN[:3], "--out-dir", f"{R}/mine_run", *TRAIN[5:]], "holds files gptlab did not write (loss.png, metrics"),
    ([*TRAIN[:3], "--out-dir", f"{R}/mine_link", *TRAIN[5:]], "holds files gptlab did not write"),
    ([*TRAIN[:3], "--out-dir", f"{R}/file.txt", *TRAIN[5:]], "is a file, not a folder"),
    (["align", "sft", RUN, "--data", f"{R}/chats.jsonl", "--out-dir", f"{R}/mine_run"], "did not write"),
    (["prepare", f"{R}/corpus.txt", "--out-dir", f"{R}/data_with_run", "--tokenizer", "char"], "and other things"),
    (["eval", "fewshot", RUN, "--plot", f"{R}/file.txt"], "already exists"),
    (["convert", RUN, f"{R}/file.txt", "--to", "gguf"], "already exists"),
    # values of the wrong type where they enter
    (["prepare", f"{R}/x.parquet", "--out-dir", f"{R}/x", "--tokenizer", "char"], "not a readable Parquet file"),
    (["train", "--data", f"{R}/data_nokey", *TRAIN[3:]], "lacks 'vocab_size'"),
    (["eval", "lambada", RUN, "--path", f"{R}/lambada_int.jsonl"], "field 'text' is int, not a string"),
    (["eval", "fewshot", RUN, "--path", f"{R}/fewshot_label.jsonl"], "field 'label' is list"),
    (["eval", "generate", RUN, "qa", f"{R}/qa_numbers.jsonl"], "'answers' must be a non-empty list of strings"),
    (["eval", "generate", RUN, "qa", f"{R}/qa_none.jsonl"], "'answers' must be a non-empty list of strings"),
    (["eval", "fewshot", RUN, "--template", "{text} {foo}"], "unknown placeholders ['foo']"),
    (["eval", "fewshot", RUN, "--template", "{label} {text}"], "end its placeholders with {label}"),
    (["eval", "fewshot", RUN, "--template", "{text"], "not a valid template"),
    (["align", "sft", RUN, "--data", f"{R}/sft_msgs.jsonl", "--out-dir", f"{R}/x"], "messages must be"),
    (["align", "sft", RUN, "--data", f"{R}/sft_msgs_list.jsonl", "--out-dir", f"{R}/x"], "messages must"),
    (["align", "dpo", RUN, "--data", f"{R}/dpo_prompt.jsonl", "--out-dir", f"{R}/x"], 'prompt" must be'),
    ([*SAMPLE[:1], f"{R}/q_badmode", *SAMPLE[2:]], "quantization record"),
    ([*SAMPLE[:1], f"{R}/q_string", *SAMPLE[2:]], "quantization record"),
    ([*SAMPLE[:1], f"{R}/q_group", *SAMPLE[2:]], "quantization record"),
    ([*SAMPLE[:1], f"{R}/q_dtype", *SAMPLE[2:]], "is float32, the model needs int8"),
    (["prepare", "shapes", "--image-size", "8", "--out-dir", f"{R}/x"], "out of range"),
    (["sample", RUN, "--image", "/dev/zero", "--max-new-tokens", "1"], "takes no images"),
    # devices and FIFOs are never read (they would never end): every input file must be a regular file
    (["sample", RUN, "--prompt-file", "/dev/zero"], "is not a regular file"),
    (["eval", "perplexity", RUN, "/dev/zero"], "is not a regular file"),
    (["eval", "lambada", RUN, "--path", "/dev/zero"], "is not a regular file"),
    (["prepare", "/dev/zero", "--out-dir", f"{R}/x", "--tokenizer", "char"], "is not a regular file"),
    (["align", "sft", RUN, "--data", "/dev/zero", "--out-dir", f"{R}/x"], "is not a regular file"),
    (
        [
            "train",
            "--resume",
            "--data",
            DATA,
            "--out-dir",
            RUN,
            "--model",
            "tiny",
            "--block-size",
            "32",
            "--max-iters",
            "2",
            "--device",
            "cpu",
        ],
        "already at step 4",
    ),
    (["bogus-verb"], "invalid choice"),
    (["train", "--no-such-flag"], "unrecognized arguments"),
]


def _ids():
    seen: dict[str, int] = {}
    out = []
    for argv, _ in CASES:
        key = "-".join(a.replace(R, "").strip("/").replace("/", "_")[:24] for a in argv[:6])
        seen[key] = seen.get(key, 0) + 1
        out.append(f"{key}#{seen[key]}")
    return out


def test_the_table_has_150_cases():
    assert len(CASES) >= 150


@pytest.mark.parametrize("argv,needle", CASES, ids=_ids())
def test_bad_input_is_one_line_and_changes_nothing(argv, needle, sandbox, capsys, monkeypatch):
    monkeypatch.chdir(sandbox)  # default paths (runs/..., data/...) resolve inside the sandbox too
    assert_one_line_error([a.replace(R, str(sandbox)) for a in argv], capsys, sandbox, needle)


def _out_of_range(r: Range, integer: bool):
    """Values just outside, far outside and not finite (floats), for a range."""
    values = []
    if r.lo is not None:
        values += [r.lo if r.lo_open else r.lo - (1 if integer else 1e-6), r.lo - 1e6]
    if r.hi is not None:
        values += [r.hi if r.hi_open else r.hi + (1 if integer else 1e-6), r.hi + 1e6]
    return values if integer else values + [math.nan, math.inf, -math.inf]


RANGED = [
    (f.name, f.metadata["range"], isinstance(f.default, int))
    for f in TrainConfig.fields()
    if f.metadata.get("range") is not None
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(RANGED).flatmap(lambda f: st.tuples(st.just(f[0]), st.sampled_from(_out_of_range(f[1], f[2])))))
def test_every_out_of_range_training_value_is_refused(sandbox, capsys, monkeypatch, case):
    name, value = case
    monkeypatch.chdir(sandbox)
    argv = [a.replace(R, str(sandbox)) for a in TRAIN] + [f"--{name.replace('_', '-')}", repr(value)]
    assert_one_line_error(argv, capsys, sandbox, f"--{name.replace('_', '-')}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.integers(),
            st.floats(allow_nan=True),
            st.text(max_size=8),
            st.none(),
            st.lists(st.integers(), max_size=3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_malformed_jsonl_records_are_one_line(sandbox, capsys, monkeypatch, tmp_path_factory, records):
    """JSON values that are not objects with a string ``text`` field: prepare refuses them with the line number."""
    monkeypatch.chdir(sandbox)
    src = tmp_path_factory.mktemp("jsonl") / "bad.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert_one_line_error(
        ["prepare", str(src), "--out-dir", str(sandbox / "x"), "--tokenizer", "char"], capsys, sandbox, "line 1"
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["lr", "batch_size", "beta1", "dropout", "seed", "max_iters"]),
        st.one_of(
            st.text("abc xyz_-", max_size=5),
            st.booleans(),
            st.lists(st.integers(), max_size=2),
            st.floats(min_value=-1e9, max_value=-1e-9),
        ),
        min_size=1,
    )
)
def test_malformed_recipes_are_one_line(sandbox, capsys, monkeypatch, tmp_path_factory, values):
    monkeypatch.chdir(sandbox)
    recipe = tmp_path_factory.mktemp("toml") / "r.toml"
    optim = {k: v for k, v in values.items() if k in ("lr", "beta1")}  # these live in the [optim] table
    top = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if k not in optim)  # JSON scalars are TOML
    recipe.write_text(
        top + ("[optim]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in optim.items()) if optim else "")
    )
    assert_one_line_error(
        ["train", "--recipe", str(recipe), "--data", str(sandbox / "data"), "--out-dir", str(sandbox / "new_run")],
        capsys,
        sandbox,
        "gptlab: error: invalid",  # the training config or its nested optimizer config
    )


def test_broken_pipe_is_quiet(tmp_path):
    import subprocess
    import sys

    from .conftest import ENV, REPO

    r = subprocess.run(
        f"{sys.executable} -m gptlab plan compare | head -1",
        shell=True,
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.stdout.count("\n") == 1 and "Traceback" not in r.stderr and r.stderr == "", r.stderr


@pytest.mark.parametrize("verb", ["train", "align", "scale", "prepare"])
def test_a_folder_in_use_is_refused_naming_the_holder(sandbox, capsys, monkeypatch, verb):
    from gptlab.files import folder_lock

    monkeypatch.chdir(sandbox)
    target = sandbox / "busy"
    argv = {
        "train": ["train", "--data", str(sandbox / "data"), "--out-dir", str(target), "--model", "tiny"],
        "align": [
            "align",
            "sft",
            str(sandbox / "run"),
            "--data",
            str(sandbox / "chats.jsonl"),
            "--out-dir",
            str(target),
            "--device",
            "cpu",
        ],
        "scale": ["scale", "--data", str(sandbox / "data"), "--out-dir", str(target), "--tokens", "1e4"],
        "prepare": ["prepare", str(sandbox / "corpus.txt"), "--out-dir", str(target), "--tokenizer", "char"],
    }[verb]
    lock = sandbox / ".busy.lock" if verb == "prepare" else target / ".lock"
    target.mkdir()
    try:
        with folder_lock(lock, "test"):
            line = assert_one_line_error(argv, capsys, sandbox, "is in use by another gptlab process")
            assert f"pid {os.getpid()}" in line
    finally:
        target.rmdir()


def test_files_follow_the_umask(sandbox, tmp_path):
    old = os.umask(0o002)
    try:
        prepare([str(sandbox / "corpus.txt")], tmp_path / "d", tokenizer="char", progress=False)
        train(
            tiny_cfg(
                tmp_path / "d",
                tmp_path / "run",
                max_iters=2,
                checkpoint_interval=2,
                eval_interval=2,
                eval_iters=1,
                final_eval_tokens=256,
            ),
            progress=False,
        )
    finally:
        os.umask(old)
    files = list((tmp_path / "d").iterdir()) + [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o664)}


def test_an_error_during_training_is_on_its_own_line_after_the_bar(sandbox, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(sandbox)
    rc = main(
        [
            "train",
            "--data",
            str(sandbox / "data"),
            "--out-dir",
            str(tmp_path / "r"),
            "--model",
            "tiny",
            "--block-size",
            "32",
            "--max-iters",
            "40",
            "--lr",
            "10",
            "--warmup-iters",
            "0",
            "--grad-clip",
            "0",
            "--log-interval",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.endswith("\n")
    last = err.splitlines()[-1]
    assert last.startswith("gptlab: error: the loss diverged to") and "\r" not in last, err[-500:]


def test_a_run_goes_into_a_new_or_empty_folder_a_run_or_a_dataset_of_its_own(sandbox, tmp_path):
    """What a run may write into: a new folder, an empty one, an earlier gptlab run, or a dataset folder holding
    only the dataset's files (then it becomes a run too, and prepare no longer replaces it)."""
    (tmp_path / "empty").mkdir()
    shutil.copytree(sandbox / "data", tmp_path / "data")
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "data"):
        cfg = tiny_cfg(tmp_path / "data", out, max_iters=2, eval_interval=2, eval_iters=1, final_eval_tokens=256)
        train(cfg, progress=False)
        assert (out / "checkpoints").is_dir() and (out / ".gptlab-run").is_file()
    assert (tmp_path / "data" / "train_000.bin").is_file()  # the dataset's files are still there
    with pytest.raises(GptlabError, match="and other things"):
        prepare([str(sandbox / "corpus.txt")], tmp_path / "data", tokenizer="char", progress=False)


def test_a_rank_checking_while_the_main_rank_starts_the_run_is_not_refused(tmp_path, monkeypatch):
    """Under torchrun every rank checks --out-dir while rank 0 may already be starting the run in it (marker, then
    its files). Interleave that start right after the check has asked whether the folder is a run: still accepted."""
    from gptlab import files

    out = tmp_path / "run"
    out.mkdir()
    asked = files.is_run

    def main_rank_starts_meanwhile(folder):
        answer = asked(folder)
        files.mark_run(folder)
        (folder / "metrics.jsonl").write_text("{}\n")
        return answer

    monkeypatch.setattr(files, "is_run", main_rank_starts_meanwhile)
    files.check_run_folder(out)  # the folder was empty when checked: nothing in it is foreign
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(GptlabError, match="did not write"):  # what was there before the run started still counts
        files.check_run_folder(tmp_path / "mine")


def test_a_second_writer_of_one_output_file_is_refused(sandbox, tmp_path, capsys):
    """Single-file outputs are locked as folders are: while one process writes x.gguf (here: holds its lock), a
    second `convert ... x.gguf` (and a --plot of the same name) is refused at once, and nothing is written."""
    from gptlab.files import folder_lock

    from .conftest import random_gpt2_checkpoint

    model = random_gpt2_checkpoint(tmp_path / "gpt2", 64)
    target = tmp_path / "x.png"
    with folder_lock(tmp_path / ".x.png.lock", "the output"):
        rc = main(["eval", "fewshot", str(model), "--shots", "0", "--limit", "2", "--plot", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "in use by another gptlab process" in err and not target.exists(), err
    with folder_lock(tmp_path / ".x.gguf.lock", "the output"):
        rc = main(["convert", str(model), str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "in use by another gptlab process" in err and not (tmp_path / "x.gguf").exists(), err
    assert main(["convert", str(model), str(tmp_path / "x.gguf")]) == 0  # once the other writer is gone


def test_the_python_api_refuses_a_source_that_is_not_a_path(sandbox):
    import gptlab

    for bad in (None, 5, 3.5, b"run", "", ["run"]):
        with pytest.raises(GptlabError, match="a model source is a path or a model name"):
            gptlab.load(bad, device="cpu")


def test_a_character_level_hugging_face_folder_drafts_for_its_own_run(sandbox, capsys):
    """The HF export of a character-level run has a word-level tokenizer without an unknown token, so the
    tokenizer probe text cannot be encoded: the tokenizers are compared token by token instead, and agree."""
    argv = ["sample", str(sandbox / "run"), "--draft", str(sandbox / "hf"), "--max-new-tokens", "4", "--prompt", "ab"]
    assert main([*argv, "--temperature", "0"]) == 0, capsys.readouterr().err
