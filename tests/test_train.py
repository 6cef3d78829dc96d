"""The trainer: learning, exact resume after SIGKILL, DDP equivalence, checkpoint safety, schedules."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptlab import checkpoint
from gptlab.align.config import AlignConfig
from gptlab.config import preset
from gptlab.data.shards import read_shard
from gptlab.errors import GptlabError
from gptlab.eval.exposure import exposure_report
from gptlab.metrics import read_rows
from gptlab.model import GPT
from gptlab.train.config import TrainConfig
from gptlab.train.optim import FINETUNE_OPTIM, OptimConfig, lr_at, make_optimizer
from gptlab.train.scheduled_sampling import mix_in_predictions, ss_probability
from gptlab.train.trainer import train

from .conftest import ENV, kill_once_written, losses, tiny_cfg, torchrun


def test_training_beats_the_unigram_entropy(char_data, tmp_path):
    tokens = np.asarray(read_shard(char_data / "train_000.bin"))
    p = np.bincount(tokens) / len(tokens)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # best loss without context, in nats
    summary = train(tiny_cfg(char_data, tmp_path / "run", max_iters=150), progress=False)
    assert summary["final_val_loss"] < unigram - 0.5, (summary["final_val_loss"], unigram)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    steps = [s for s, _ in losses(tmp_path / "run")]
    assert steps == list(range(1, 151))


def _train_cmd(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "gptlab",
        "train",
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--model",
        "baby",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--dropout",
        "0.1",
        "--ss-schedule",
        "linear",
        "--ss-max-prob",
        "0.3",
        "--max-iters",
        "400",
        "--checkpoint-interval",
        "50",
        "--eval-interval",
        "50",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--keep-last",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--final-eval-tokens",
        "5000",
        "--json",
        *extra,
    ]


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_run_bit_for_bit(char_data, tmp_path):
    full = subprocess.run(_train_cmd(char_data, tmp_path / "full"), env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    kill_once_written(
        _train_cmd(char_data, tmp_path / "killed"), tmp_path / "killed/checkpoints/step-0000100/state.json"
    )
    done = [p.name for p in checkpoint.list_checkpoints(tmp_path / "killed")]
    assert done and done[-1] < "step-0000400"

    resumed = subprocess.run(
        _train_cmd(char_data, tmp_path / "killed", "--resume"), env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # every step, exactly
    a = checkpoint.load_checkpoint(tmp_path / "full")[0].state_dict()
    b = checkpoint.load_checkpoint(tmp_path / "killed")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(resumed.stdout)["final_val_loss"] == json.loads(full.stdout)["final_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel,model", [("ddp", "tiny"), ("fsdp", "tiny"), ("fsdp", "baby-modern")]
)  # the modern block (rotary, RMSNorm, QK-norm, untied head) sharded too
def test_two_processes_match_one_process_with_the_same_global_batch(char_data, tmp_path, parallel, model):
    common = [
        "--data",
        str(char_data),
        "--model",
        model,
        "--block-size",
        "32",
        "--max-iters",
        "30",
        "--log-interval",
        "1",
        "--eval-interval",
        "30",
        "--eval-iters",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--final-eval-tokens",
        "5000",
        "--dtype",  # not auto: its probe times each process's own batch, 8 rows here and 4 there
        "float32",
        "--json",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "gptlab", "train", "--out-dir", str(tmp_path / "one"), "--batch-size", "8", *common],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = torchrun(
        "train", "--out-dir", str(tmp_path / "two"), "--batch-size", "4", "--parallel", parallel, *common, timeout=300
    )  # ~10 s here; a hang at exit (a deadlock in the process group teardown, fixed) shows as a timeout
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 31))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=2e-5)
    assert json.loads(ddp.stdout)["world_size"] == 2  # one summary, from rank 0 only
    a = checkpoint.load_checkpoint(tmp_path / "one")[0].state_dict()  # the full (gathered) weights were checkpointed
    b = checkpoint.load_checkpoint(tmp_path / "two")[0].state_dict()
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5)}
    assert not bad, bad


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(char_data, run, max_iters=4, checkpoint_interval=2, eval_interval=2), progress=False)
    good = checkpoint.list_checkpoints(run)
    assert [p.name for p in good] == ["step-0000002", "step-0000004"]
    diverging = tiny_cfg(
        char_data, run, max_iters=40, checkpoint_interval=2, eval_interval=2, lr=10.0, warmup_iters=0, grad_clip=0.0
    )
    with pytest.raises(GptlabError, match=r"loss diverged to \S+ at step \d+") as e:
        train(diverging, resume=True, progress=False)
    assert f"the last good checkpoint is {good[-1]}" in str(e.value)
    assert (
        math.isfinite(checkpoint.read_state(good[-1])["val_loss"]) and checkpoint.read_state(good[-1])["val_loss"] < 5
    )
    assert checkpoint.list_checkpoints(run) == good  # nothing written after the loss broke
    state = checkpoint.read_state(good[-1])
    assert all(torch.isfinite(t).all() for t in checkpoint.load_weights(good[-1], state).values())


def test_checkpoint_errors_are_clear(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(char_data, run, max_iters=4, checkpoint_interval=2, eval_interval=2), progress=False)
    with pytest.raises(GptlabError, match="already holds checkpoints; pass --resume"):
        train(tiny_cfg(char_data, run, max_iters=4), progress=False)
    with pytest.raises(GptlabError, match="model differs"):
        train(tiny_cfg(char_data, run, max_iters=8, model_overrides={"n_layer": 3}), resume=True, progress=False)
    latest = checkpoint.resolve(run)
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GptlabError, match="corrupt"):
        checkpoint.load_checkpoint(run)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(GptlabError, match="corrupt"):
        checkpoint.load_checkpoint(latest)
    (latest / "state.json").write_text('{"format": "gptlab-checkpoint", "vers')
    with pytest.raises(GptlabError, match="missing or corrupt"):
        checkpoint.load_checkpoint(latest)
    with pytest.raises(GptlabError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_shape_mismatch_names_the_tensor(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(char_data, run, max_iters=2, checkpoint_interval=2, eval_interval=2), progress=False)
    checkpoint_dir = checkpoint.resolve(run)
    state = json.loads((checkpoint_dir / "state.json").read_text())
    state["model_config"]["n_embd"] = 32
    (checkpoint_dir / "state.json").write_text(json.dumps(state))
    with pytest.raises(GptlabError, match=r"tensor 'wte.weight' has shape \(\d+, 64\), the config needs \(\d+, 32\)"):
        checkpoint.load_checkpoint(checkpoint_dir)


def test_keep_last_and_best(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(char_data, run, max_iters=50, checkpoint_interval=10, eval_interval=10, keep_last=2), progress=False)
    names = [p.name for p in checkpoint.list_checkpoints(run)]
    state = checkpoint.read_state(checkpoint.resolve(run))
    vals = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r:
            vals[r["step"]] = r["val_loss"]
    best = min(vals, key=vals.get)
    assert state["best_step"] == best
    assert names == sorted({f"step-{best:07d}", "step-0000040", "step-0000050"})
    assert checkpoint.resolve(run / "best").name == f"step-{best:07d}"  # `--checkpoint RUN/best`
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_lr_schedule_hand_computed():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-3 * 1 / 11)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way: cos(pi/2) = 0
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4) and lr_at(500, cfg, 110) == pytest.approx(1e-4)
    # one config type, nested in both; recipes give it as a table, flags flat
    assert TrainConfig.from_sources(None, lr=2e-3).optim == OptimConfig(lr=2e-3)
    tuned = AlignConfig.from_sources(None, data="d.jsonl", model="m", lr=3e-4).optim
    assert tuned == dataclasses.replace(FINETUNE_OPTIM, lr=3e-4) and type(tuned) is type(TrainConfig().optim)


def test_weight_decay_only_on_matrices():
    model = GPT(preset("tiny"))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping and not
def test_clip_and_step_equals_torchs_clip_grad_norm_then_step(optimizer, max_norm):
    """The trainer's clipping (dot-product norm; for fused AdamW the coefficient as the optimizer's grad_scale)
    against torch.nn.utils.clip_grad_norm_ then step, on GPT-shaped parameters, to float rounding (Muon's
    Newton-Schulz iteration runs in bf16, so its updates differ by a bf16 rounding where the gradients differ by an
    fp32 one)."""
    from gptlab.train.optim import clip_and_step

    torch.manual_seed(0)
    cfg = OptimConfig(lr=1e-2, optimizer=optimizer)
    models = [GPT(preset("baby").replace(n_layer=2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, cfg, "cpu") for m in models]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for m in models:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(list(models[0].parameters()), max_norm)
        opts[0].step()
        clip_and_step(opts[1], list(models[1].parameters()), max_norm)
        assert not hasattr(opts[1], "grad_scale")  # no scale is left behind for a later step
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9, msg=name)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7 if optimizer == "adamw" else 5e-4)
    assert max_norm > 1 or (torch.stack([p.grad.norm() for p in models[1].parameters()]).norm() - max_norm).abs() < 1e-5
    if optimizer == "adamw":  # a fused AdamW resumed from a run whose AdamW was not (FSDP's): its groups say so
        state = opts[1].state_dict()
        for group in state["param_groups"]:
            group["fused"] = None
        opts[1].load_state_dict(state)
        assert opts[1].defaults["fused"] and not opts[1].param_groups[0]["fused"]
        clip_and_step(opts[1], list(models[1].parameters()), max_norm)


def test_scheduled_sampling_schedules_hand_computed():
    assert ss_probability("none", 50, 100, 0.5, 10) == 0
    assert ss_probability("constant", 50, 100, 0.5, 10) == 0.5
    assert ss_probability("linear", 25, 100, 0.4, 10) == pytest.approx(0.1)
    assert ss_probability("inverse_sigmoid", 0, 100, 1.0, 10) == pytest.approx(1 - 10 / 11)
    assert ss_probability("inverse_sigmoid", 50, 100, 1.0, 10) == pytest.approx(1 - 10 / (10 + math.exp(5)))
    assert ss_probability("exponential", 3, 100, 1.0, 0.5) == pytest.approx(1 - 0.125)


def test_mix_in_predictions_uses_the_models_greedy_guesses():
    model = GPT(preset("tiny", vocab_size=20, block_size=16)).eval()
    x = torch.randint(0, 20, (3, 16))
    g = torch.Generator().manual_seed(0)
    assert mix_in_predictions(model, x, 0.0, g).equal(x)
    all_pred = mix_in_predictions(model, x, 1.0, g)
    ref = torch.stack(
        [torch.tensor([int(model(x[b : b + 1, : t + 1])[0][0, -1].argmax()) for t in range(15)]) for b in range(3)]
    )  # one prefix at a time: an independent computation
    assert all_pred[:, 0].equal(x[:, 0]) and all_pred[:, 1:].equal(ref)


def test_exposure_report_without_sampling_equals_teacher_forcing():
    model = GPT(preset("tiny", vocab_size=30, block_size=24))
    toks = torch.randint(0, 30, (60,)).tolist()  # windows of 25: 25 + 25 + 10 tokens
    r = exposure_report(model, toks, p=0.0)
    assert r["replaced_fraction"] == 0 and r["windows"] == 3 and r["tokens"] == 24 + 24 + 9
    assert r["scheduled_sampling_loss"] == pytest.approx(r["teacher_forcing_loss"], rel=1e-5)
    r1 = exposure_report(model, toks, p=1.0)
    assert r1["replaced_fraction"] == 1.0


def test_recipe_then_flags_precedence(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'model = "baby"\nmax_iters = 50\n[optim]\nlr = 0.002\nbeta2 = 0.9\n'
        "[model_overrides]\nn_layer = 3\ndropout = 0.1\n"
    )
    cfg = TrainConfig.from_sources(recipe, max_iters=70, lr=None, beta2=0.95)
    # a flag wins, an unset flag keeps the recipe, an optimizer flag goes to the nested [optim]
    assert (cfg.model, cfg.optim.lr, cfg.optim.beta2, cfg.max_iters) == ("baby", 0.002, 0.95, 70)
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay  # untouched fields keep their defaults
    assert cfg.model_overrides == {"n_layer": 3, "dropout": 0.1}
    recipe.write_text("lr = 0.003\n")  # the old flat layout: still read, with a warning
    assert TrainConfig.from_sources(recipe).optim.lr == 0.003
    recipe.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(GptlabError, match=r"unknown option\(s\) \['learning_rate'\] in \[optim\]"):
        TrainConfig.from_sources(recipe)
    recipe.write_text("lr = 0.002\nlearning_rate = 1\n")
    with pytest.raises(GptlabError, match=r"unknown option\(s\) \['learning_rate'\]"):
        TrainConfig.from_sources(recipe)
    recipe.write_text('lr = "fast"\n')
    with pytest.raises(GptlabError, match="lr = 'fast' should be of type float"):
        TrainConfig.from_sources(recipe)
    recipe.write_text("lr = [broken\n")
    with pytest.raises(GptlabError, match="not valid TOML"):
        TrainConfig.from_sources(recipe)


def test_compiled_training_matches_eager(char_data, tmp_path):
    """--compile (inductor on CPU) trains the same model: per-step losses equal the eager run's to fp32 noise."""
    kw = dict(model="tiny", max_iters=4, eval_interval=2, eval_iters=1, checkpoint_interval=0, final_eval_tokens=500)
    train(tiny_cfg(char_data, tmp_path / "eager", **kw), progress=False)
    train(tiny_cfg(char_data, tmp_path / "compiled", compile=True, **kw), progress=False)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in compiled], [v for _, v in eager], rtol=1e-4)


def test_configs_written_by_the_previous_layout_still_read(tmp_path):
    """A sweep's run.json from before the nested optimizer config (flat lr, ckpt_interval) reads as the same config."""
    from gptlab.scale.sweep import read_run_config

    new = TrainConfig.from_sources(None, lr=2e-3, min_lr=2e-4, warmup_iters=7, checkpoint_interval=9, max_iters=30)
    old = {k: v for k, v in new.to_dict().items() if k not in ("optim", "checkpoint_interval")}
    old.update(new.optim.to_dict(), ckpt_interval=9)
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert read_run_config(tmp_path) == new


def test_no_throughput_is_logged_for_the_untimed_first_step(char_data, tmp_path):
    """The work clock starts at the end of the first step (compilation, warm-up): a log at step 1 has no elapsed
    time to divide by, so it records no rate (null), not 10^11 tokens per second; later rows are real rates."""
    train(tiny_cfg(char_data, tmp_path / "r", max_iters=3, eval_interval=1, checkpoint_interval=0), progress=False)
    rows = [r for r in read_rows(tmp_path / "r" / "metrics.jsonl") if "tok_per_s" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["tok_per_s"] is None
    tokens_per_step = 8 * 32
    for r in rows[1:]:  # one step of 8 x 32 tokens takes more than a microsecond and less than a minute here
        assert tokens_per_step / 60 < r["tok_per_s"] < tokens_per_step * 1e6


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_modern_block_resumes_bit_for_bit_with_either_optimizer(char_data, tmp_path, optimizer):
    """The modern preset (rotary positions, parameter-free RMSNorm, ReLU², QK-norm, untied soft-capped head) trains
    with AdamW or Muon + AdamW, and resuming from a middle checkpoint repeats the uninterrupted run exactly (Muon's
    momentum buffers and AdamW's moments are both in the checkpoint)."""
    import shutil

    kw = dict(model="baby-modern", max_iters=12, checkpoint_interval=6, eval_interval=6, optimizer=optimizer)
    full = train(tiny_cfg(char_data, tmp_path / "full", **kw), progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for p in checkpoint.list_checkpoints(cut):
        if p.name > "step-0000006":
            shutil.rmtree(p)
    again = train(tiny_cfg(char_data, cut, **kw), resume=True, progress=False)
    assert again["final_val_loss"] == full["final_val_loss"]
    a = checkpoint.load_checkpoint(tmp_path / "full")[0].state_dict()
    b = checkpoint.load_checkpoint(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(cut) == losses(tmp_path / "full")


def test_auto_dtype_on_the_cpu_is_measured_cached_said_and_kept_on_resume(char_data, tmp_path, monkeypatch):
    """--dtype auto on a CPU: a probe at the run's shapes decides (the tiny model: fp32, its casts cost more than
    bf16 saves) and the summary says why; the verdict is cached, and a cached bf16 verdict is followed; a resumed
    run keeps the dtype its checkpoints recorded whatever the cache says now, and repeats the uninterrupted run
    exactly."""
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    cfg = dict(max_iters=6, checkpoint_interval=3, eval_interval=3)
    full = train(tiny_cfg(char_data, tmp_path / "full", **cfg), progress=False)
    (probe,) = (tmp_path / "cache" / "dtype-probe").iterdir()
    verdict = json.loads(probe.read_text())
    assert full["dtype"] == verdict["dtype"] == "float32"
    assert full["dtype_reason"].startswith("auto: bf16 autocast ran") and "(probe:" in full["dtype_reason"]
    assert verdict["result"]["speedup"] < 1.15  # the reason it is fp32

    part = train(tiny_cfg(char_data, tmp_path / "part", **{**cfg, "max_iters": 3}), progress=False)
    assert "(cached probe:" in part["dtype_reason"]
    verdict["dtype"] = verdict["result"]["dtype"] = "bfloat16"  # as if this CPU ran bf16 faster at these shapes
    probe.write_text(json.dumps(verdict))
    resumed = train(tiny_cfg(char_data, tmp_path / "part", **cfg), resume=True, progress=False)
    assert resumed["dtype"] == "float32" and "as the run it resumes chose" in resumed["dtype_reason"]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    fresh = train(tiny_cfg(char_data, tmp_path / "bf16", **{**cfg, "max_iters": 1}), progress=False)
    assert fresh["dtype"] == "bfloat16" and "(cached probe:" in fresh["dtype_reason"]
    explicit = train(tiny_cfg(char_data, tmp_path / "fp32", max_iters=1, dtype="float32"), progress=False)
    assert explicit["dtype_reason"] == "--dtype float32"
