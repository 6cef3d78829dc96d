"""``gptlab plan <what>``: model, train, infer, scaling, attention, mfu, compare. Each prints a table, or with
``--json`` one JSON object of the same figures."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..errors import GptlabError
from ..options import add_json, count, emit, number, number_list, parse_number, parse_set
from ..recipe import NON_NEGATIVE, POSITIVE, Range
from .hardware import HARDWARE, PF_DAY, hardware, training_time
from .memory import (
    ATTENTION,
    DTYPE_BYTES,
    OPTIMIZERS,
    RECOMPUTE,
    inference,
    kv_cache_bytes,
    training_memory,
    weights_bytes,
)
from .scaling import LAWS, compare_allocations, load_law
from .shape import (
    Shape,
    attention_cost,
    attention_crossover,
    forward_flops_per_token,
    image_flops,
    matmul_params,
    mfu,
    params,
    resolve,
    training_flops_per_token,
)

MFU = Range(0, 1, lo_open=True)


def si(x: float, unit: str = "") -> str:
    for div, p in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:,.3g} {p}{unit}"
    return f"{x:,.3g} {unit}".rstrip()


def gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


# `--set` takes the planner's names and, as `gptlab train --set` does, the model config's
CONFIG_NAMES = {"n_embd": "d_model", "block_size": "n_ctx"}


def _shape(args: argparse.Namespace) -> Shape:
    changes = {CONFIG_NAMES.get(k, k): v for k, v in parse_set(args.set, "n_ctx=4096").items()}
    return resolve(args.model, **changes)


def _hw(args: argparse.Namespace):
    return hardware(args.hardware, args.peak_tflops, args.bandwidth_gbs, args.memory_gib)


def plan_model(args: argparse.Namespace) -> tuple[dict, str]:
    s = _shape(args)
    p, f = params(s), forward_flops_per_token(s)
    r: dict[str, Any] = {
        "shape": s.__dict__,
        "params": p,
        "forward_flops_per_token": f,
        "matmul_params": matmul_params(s),
        "training_flops_per_token": training_flops_per_token(s),
        "weights_bytes": {d: weights_bytes(s, d) for d in DTYPE_BYTES},
        "kv_cache_bytes_per_token": {d: kv_cache_bytes(s, 1, 1, d) for d in ("fp32", "bf16", "int8")},
    }
    if s.image_size:
        r["image_flops"] = image_flops(s)
    lines = [
        f"{args.model}: {s.n_layer} layers, d_model {s.d_model}, {s.n_head} heads"
        f"{f' ({s.kv_heads} kv)' if s.kv_heads != s.n_head else ''}, d_ff {s.ff}, context {s.n_ctx}, "
        f"vocab {s.vocab_size:,}"
        + (f", {s.n_experts} experts ({s.experts_per_token} per token)" if s.n_experts > 1 else ""),
        "",
        "parameters:",
    ]
    lines += [f"  {k:<20}{v:>20,}" for k, v in p.items()]
    lines += ["", "forward FLOPs per token (Kaplan et al. 2020, Table 1):"]
    lines += [f"  {k:<20}{si(v, 'FLOP'):>20}" for k, v in f.items()]
    lines += [
        f"  training (PaLM 6N + 12·L·d·T){si(r['training_flops_per_token'], 'FLOP'):>12}",
        "",
        "weights: " + ", ".join(f"{d} {gb(v)}" for d, v in r["weights_bytes"].items()),
        "KV cache per token per sequence: "
        + ", ".join(f"{d} {v / 1024:,.1f} KiB" for d, v in r["kv_cache_bytes_per_token"].items()),
    ]
    if s.image_size:
        fl = r["image_flops"]
        lines += [
            "",
            f"image prefix: {s.image_tokens} tokens of the {s.n_ctx}-token context ({s.image_size}x{s.image_size}x"
            f"{s.image_channels}, {s.patch_size}x{s.patch_size} patches, {s.image_encoder} encoder, {s.projector} "
            f"projector); forward FLOPs per image:",
        ]
        lines += [f"  {k:<20}{si(v, 'FLOP'):>20}" for k, v in fl.items() if k != "image_tokens"]
    return r, "\n".join(lines)


def plan_train(args: argparse.Namespace) -> tuple[dict, str]:
    s, hw = _shape(args), _hw(args)
    seq = args.seq_len or s.n_ctx
    per_token = training_flops_per_token(s, seq)
    n = params(s)
    flops = {"6ND": 6.0 * n["active"] * args.tokens, "with_attention": per_token * args.tokens}
    devices = args.devices or args.dp * args.tp * args.pp
    t = training_time(
        flops["6ND" if args.six_nd else "with_attention"],
        hw,
        devices,
        args.mfu,
        args.price,
        args.tokens,
        args.batch_tokens,
    )
    mem = training_memory(
        s,
        args.micro_batch,
        seq,
        args.optimizer,
        args.precision,
        args.dp,
        args.tp,
        args.pp,
        args.zero,
        args.sequence_parallel,
        args.recompute,
        args.attention,
        args.dropout,
        args.grad_accum,
    )
    r = {
        "params": n["total"],
        "active_params": n["active"],
        "tokens": args.tokens,
        "hardware": hw.__dict__,
        "devices": devices,
        "flops": flops,
        "time": t,
        "memory_per_device": mem,
        "fits": mem["peak"] <= hw.memory_bytes,
    }
    lines = [
        f"{args.model} ({n['total']:,} parameters) on {args.tokens:,.4g} tokens, {devices:,} × {hw.name} at "
        f"{args.mfu:.0%} MFU",
        f"  training FLOPs     6·N·D = {flops['6ND']:.4g}; with attention (PaLM) = {flops['with_attention']:.4g}"
        f" = {t['pf_days']:,.0f} PF-days (used: {'6ND' if args.six_nd else 'with attention'})",
        f"  time               {t['days']:,.2f} days ({t['seconds'] / 3600:,.0f} h), "
        f"{t['device_hours']:,.0f} device-hours" + (f", ${t['cost']:,.0f} at ${args.price}/h" if args.price else ""),
    ]
    if "steps" in t:
        lines.append(f"  steps              {t['steps']:,} of {args.batch_tokens:,.0f} tokens")
    lines.append(
        f"  memory per device  ({args.optimizer}/{args.precision}, dp {args.dp}, tp {args.tp}, pp {args.pp}, "
        f"ZeRO {args.zero}, micro-batch {args.micro_batch} × {seq}, {args.attention} attention, "
        f"{'dropout' if args.dropout else 'no dropout'}, recompute {args.recompute})"
    )
    lines += [f"    {k:<16}{gb(v):>14}" for k, v in mem.items()]
    lines.append(f"  {'fits' if r['fits'] else 'does NOT fit'} (peak) in {gb(hw.memory_bytes)} per device")
    return r, "\n".join(lines)


def plan_infer(args: argparse.Namespace) -> tuple[dict, str]:
    s, hw = _shape(args), _hw(args)
    r = inference(
        s,
        hw,
        args.context or s.n_ctx,
        args.batch,
        args.dtype,
        args.kv_dtype,
        args.devices,
        prompt_tokens=args.prompt_tokens,
    )
    lines = [
        f"{args.model} serving {args.batch} × {args.context or s.n_ctx} tokens in {args.dtype} on {hw.name} "
        f"({gb(hw.memory_bytes)}, {hw.bandwidth / 1e9:,.0f} GB/s, {hw.peak_flops / 1e12:,.0f} TFLOP/s)",
        f"  weights {gb(r['weights_bytes'])} + KV cache {gb(r['kv_cache_bytes'])} "
        f"({gb(r['kv_cache_bytes_per_sequence'])} per sequence) = {gb(r['memory_needed'])}",
        f"  devices: at least {r['min_devices']} for memory, {r['min_tensor_parallel']} for tensor parallelism "
        f"(must divide {s.n_head} heads); on {r['devices']}: largest batch {r['max_batch']}",
        f"  decode bound per sequence: {r['decode_tokens_per_second_bound']:,.1f} tok/s "
        f"({r['decode_ms_per_token_bound']:,.2f} ms/token; bandwidth bound "
        f"{r['decode_tokens_per_second_bandwidth_bound']:,.1f}, compute bound "
        f"{r['decode_tokens_per_second_compute_bound']:,.1f}); batch total "
        f"{r['batch_tokens_per_second_bound']:,.1f} tok/s",
        f"  prefill bound: {r['prefill_seconds_bound'] * 1000:,.1f} ms",
    ]
    return r, "\n".join(lines)


def plan_scaling(args: argparse.Namespace) -> tuple[dict, str]:
    law = load_law(args.law)
    marks = {}
    for item in args.compare or []:
        name, _, nd = item.rpartition("=")
        try:
            n, d = (parse_number(x) for x in nd.split(":"))
            if not (0 < n < 1e30 and 0 < d < 1e30):
                raise ValueError
        except (ValueError, argparse.ArgumentTypeError):
            raise GptlabError(
                f"--compare {item!r}: expected NAME=PARAMS:TOKENS with positive counts, e.g. gpt3=175B:300B"
            ) from None
        marks[name or f"{n:g}:{d:g}"] = (n, d)
    compute = args.compute or (6 * next(iter(marks.values()))[0] * next(iter(marks.values()))[1] if marks else None)
    if compute is None:
        raise GptlabError("give a budget with --compute FLOPS (e.g. 3.15e23) or a model with --compare gpt3=175B:300B")
    rows = compare_allocations(compute, marks, law)
    r: dict[str, Any] = {"compute": compute, "law": law.source, "allocations": rows}
    lines = [
        f"compute {compute:.4g} FLOPs ({compute / PF_DAY:,.1f} PF-days); losses from {law.source} "
        f"and Kaplan's joint L(N, D)",
        f"{'allocation':<12}{'params':>12}{'tokens':>12}{'tok/param':>10}{'L chinchilla':>14}{'L kaplan':>10}",
    ]
    lines += [
        f"{x['allocation']:<12}{si(float(x['params'])):>12}{si(float(x['tokens'])):>12}{x['tokens_per_param']:>10.1f}"
        f"{x['loss_chinchilla']:>14.4f}{x['loss_kaplan_nd']:>10.4f}"
        for x in rows
    ]
    if args.plot:
        from .plots import scaling_figure  # here, not at the top: matplotlib loads slowly

        budgets = [10**e for e in range(math.floor(math.log10(compute)) - 4, math.floor(math.log10(compute)) + 2)]
        r["plot"] = str(scaling_figure(Path(args.plot), budgets, law, marks))
        lines.append(f"plot: {r['plot']}")
    return r, "\n".join(lines)


def plan_attention(args: argparse.Namespace) -> tuple[dict, str]:
    s = _shape(args)
    rows = attention_cost(s, args.contexts, DTYPE_BYTES[args.dtype])
    r = {"crossover_context": attention_crossover(s), "per_layer": rows}
    lines = [
        f"{args.model}, one layer, one sequence, forward; scores in {args.dtype}",
        f"{'context':>8}{'QKᵀ FLOPs':>13}{'A·V FLOPs':>13}{'rest FLOPs':>13}{'attn share':>11}"
        f"{'scores (plain)':>16}{'flash':>12}",
    ]
    lines += [
        f"{x['context']:>8}{si(x['scores_flops']):>13}{si(x['av_flops']):>13}{si(x['rest_flops']):>13}"
        f"{x['attention_share']:>11.1%}{si(x['score_bytes'], 'B'):>16}{si(x['flash_bytes'], 'B'):>12}"
        for x in rows
    ]
    lines.append(f"attention matmuls equal the rest of the layer at {r['crossover_context']:,.0f} tokens")
    return r, "\n".join(lines)


def plan_mfu(args: argparse.Namespace) -> tuple[dict, str]:
    s, hw = _shape(args), _hw(args)
    seq = args.seq_len or s.n_ctx
    value = mfu(s, args.tokens_per_second / args.devices, hw.peak_flops, seq)
    if value > 1:
        raise GptlabError(
            f"{args.tokens_per_second:,.0f} tok/s on {args.devices} × {hw.name} would be MFU "
            f"{value:.0%}, above the hardware's peak; check --tokens-per-second, --devices, "
            f"--seq-len and --hardware"
        )
    r = {"mfu": value, "flops_per_token": training_flops_per_token(s, seq), "hardware": hw.name}
    return r, (
        f"{args.tokens_per_second:,.0f} tok/s on {args.devices} × {hw.name}: "
        f"{si(r['flops_per_token'], 'FLOP')}/token → MFU {value:.1%} of {si(hw.peak_flops, 'FLOP/s')}"
    )


def plan_compare(args: argparse.Namespace) -> tuple[dict, str]:
    hw = _hw(args)
    rows = []
    for name in args.models or list(PRESETS):
        s = resolve(name)
        p = params(s)
        mem = training_memory(s, 1, s.n_ctx)
        t = training_time(training_flops_per_token(s) * args.tokens, hw, 1, args.mfu)
        rows.append(
            {
                "model": name,
                "params": p["total"],
                "non_embedding": p["non_embedding"],
                "weights_fp32": weights_bytes(s, "fp32"),
                "weights_bf16": weights_bytes(s, "bf16"),
                "train_state_adamw_mixed": mem["weights"] + mem["gradients"] + mem["optimizer"],
                "activations_b1": mem["activations"],
                "kv_full_context_bf16": kv_cache_bytes(s, s.n_ctx),
                "train_days_one_device": t["days"],
            }
        )
    r = {"hardware": hw.name, "tokens": args.tokens, "mfu": args.mfu, "models": rows}
    lines = [
        f"train state = bf16 weights + grads + fp32 AdamW (16 B/param); activations: one sequence at full "
        f"context, fused attention, no dropout, no recomputation; days: {args.tokens:,.3g} tokens on one "
        f"{hw.name} at {args.mfu:.0%} MFU",
        f"{'model':<12}{'params':>16}{'fp32':>11}{'bf16':>11}{'train state':>13}{'activ. b=1':>12}"
        f"{'KV ctx bf16':>12}{'days':>11}",
    ]
    lines += [
        f"{x['model']:<12}{x['params']:>16,}{gb(x['weights_fp32']):>11}{gb(x['weights_bf16']):>11}"
        f"{gb(x['train_state_adamw_mixed']):>13}{gb(x['activations_b1']):>12}{gb(x['kv_full_context_bf16']):>12}"
        f"{x['train_days_one_device']:>11,.1f}"
        for x in rows
    ]
    return r, "\n".join(lines)


def cmd_presets(args: argparse.Namespace) -> None:
    rows = []
    for name, cfg in PRESETS.items():
        n = params(Shape.from_config(cfg))
        rows.append(
            {
                "name": name,
                **{k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "norm")},
                "params": n["total"],
                "non_embedding": n["non_embedding"],
            }
        )
    lines = [
        f"{'preset':<12}{'layers':>7}{'heads':>6}{'d_model':>8}{'context':>8}{'vocab':>7}{'norm':>6}"
        f"{'params':>16}{'non-embedding':>16}"
    ]
    lines += [
        f"{r['name']:<12}{r['n_layer']:>7}{r['n_head']:>6}{r['n_embd']:>8}{r['block_size']:>8}"
        f"{r['vocab_size']:>7}{r['norm']:>6}{r['params']:>16,}{r['non_embedding']:>16,}"
        for r in rows
    ]
    emit(args, {"presets": rows}, "\n".join(lines))


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("presets", help="list the model presets with exact parameter counts")
    add_json(q)
    q.set_defaults(func=cmd_presets)

    p = sub.add_parser(
        "plan",
        help="sizes, FLOPs, memory, time, cost, scaling laws, inference sizing",
        description="The planner. Models are presets (gptlab presets) changed with --set, e.g. "
        "--set n_ctx=4096 --set n_kv_head=8 --set n_experts=8 --set experts_per_token=2.",
    )
    what = p.add_subparsers(dest="what", required=True)

    def model_args(q: argparse.ArgumentParser, hw: bool = False) -> None:
        q.add_argument("model", help="preset name (gpt2, gpt3-175b, ...)")
        q.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="shape field: n_layer, d_model, n_head, n_kv_head, d_ff, n_ctx, vocab_size, bias, "
            "tie_weights, norm, n_experts, experts_per_token, expert_ff, moe_every, shared_expert",
        )
        if hw:
            hw_args(q)

    def hw_args(q: argparse.ArgumentParser, default: str = "a100") -> None:
        q.add_argument(
            "--hardware",
            default=default,
            help=f"{', '.join(HARDWARE)}, cpu (measured here) or custom (default {default})",
        )
        q.add_argument("--peak-tflops", type=number(POSITIVE), help="override the 16-bit peak (TFLOP/s)")
        q.add_argument("--bandwidth-gbs", type=number(POSITIVE), help="override the memory bandwidth (GB/s)")
        q.add_argument("--memory-gib", type=number(POSITIVE), help="override the device memory (GiB)")

    q = what.add_parser("model", help="exact parameters, FLOPs per token, weight and KV-cache sizes")
    model_args(q)
    q.set_defaults(plan=plan_model)

    q = what.add_parser("train", help="training FLOPs, time, cost and memory per device")
    model_args(q, hw=True)
    q.add_argument("--tokens", type=number(POSITIVE), required=True, help="training tokens (300B, 1.4T, 3e11; > 0)")
    q.add_argument("--devices", type=count(1), help="device count (>= 1; default dp·tp·pp)")
    q.add_argument("--mfu", type=number(MFU), default=0.4, help="model FLOPs utilization (valid: (0, 1]; default 0.4)")
    q.add_argument("--price", type=number(NON_NEGATIVE), default=0.0, help="dollars per device-hour (>= 0)")
    q.add_argument("--batch-tokens", type=number(Range(1)), help="tokens per optimizer step, for the step count")
    q.add_argument("--seq-len", type=count(1), help="training sequence length (>= 1; default the context)")
    q.add_argument(
        "--six-nd",
        action="store_true",
        help="time the run on 6·N·D alone (Kaplan et al. 2020's approximation, without attention)",
    )
    q.add_argument("--micro-batch", type=count(1), default=1, help="sequences per device per micro-step (activations)")
    q.add_argument("--optimizer", default="adamw", choices=sorted({o for o, _ in OPTIMIZERS}))
    q.add_argument("--precision", default="mixed", choices=["mixed", "fp32"])
    q.add_argument("--dp", type=count(1), default=1, help="data-parallel degree")
    q.add_argument("--tp", type=count(1), default=1, help="tensor-parallel degree")
    q.add_argument("--pp", type=count(1), default=1, help="pipeline-parallel degree")
    q.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
    q.add_argument("--sequence-parallel", action="store_true")
    q.add_argument("--recompute", default="none", choices=RECOMPUTE)
    q.add_argument(
        "--attention",
        default="flash",
        choices=ATTENTION,
        help="flash: a fused kernel that keeps no scores (PyTorch's SDPA, what gptlab trains with); eager: the "
        "a·s² scores are kept (Korthikanti et al.'s formula)",
    )
    q.add_argument("--dropout", action="store_true", help="dropout > 0: count its masks (gptlab trains without)")
    q.add_argument(
        "--grad-accum", type=count(1), default=1, help="micro-steps per step (> 1: gradients live beside activations)"
    )
    q.set_defaults(plan=plan_train)

    q = what.add_parser("infer", help="inference memory, devices, largest batch, decode and prefill bounds")
    model_args(q, hw=True)
    q.add_argument("--context", type=count(1), help="tokens per sequence (default the model's context)")
    q.add_argument("--batch", type=count(1), default=1, help="sequences decoded together (>= 1)")
    q.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES))
    q.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), help="KV-cache dtype (default --dtype)")
    q.add_argument("--devices", type=count(1), help="devices to size the batch for (>= 1; default the minimum)")
    q.add_argument("--prompt-tokens", type=count(1), help="prompt length for the prefill bound (default --context)")
    q.set_defaults(plan=plan_infer)

    q = what.add_parser("scaling", help="compute-optimal allocations of a FLOP budget and their predicted losses")
    q.add_argument("--compute", type=number(POSITIVE), help="training FLOPs (e.g. 3.15e23)")
    q.add_argument(
        "--compare",
        action="append",
        metavar="NAME=PARAMS:TOKENS",
        help="an allocation to compare, e.g. gpt3=175B:300B (its compute is the budget if --compute is not given)",
    )
    q.add_argument(
        "--law",
        default="hoffmann",
        metavar="|".join(LAWS) + "|FITS.json",
        help="L(N, D) for the losses: a published law, or the fits.json of a `gptlab scale` sweep "
        "(constants fitted on your data; adds their compute-optimal split as `fitted`)",
    )
    q.add_argument("--plot", metavar="PNG", help="write loss-vs-N, IsoFLOP and frontier panels to this file")
    q.set_defaults(plan=plan_scaling)

    q = what.add_parser("attention", help="attention FLOPs and score memory against context length")
    model_args(q)
    q.add_argument(
        "--contexts",
        type=number_list(Range(1), integer=True),
        default=[512, 1024, 2048, 4096, 8192, 16384, 32768, 131072],
        help="comma-separated lengths",
    )
    q.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="score-matrix dtype")
    q.set_defaults(plan=plan_attention)

    q = what.add_parser("mfu", help="model FLOPs utilization of a measured training throughput")
    model_args(q, hw=True)
    q.add_argument(
        "--tokens-per-second", type=number(POSITIVE), required=True, help="measured, all devices together (> 0)"
    )
    q.add_argument("--devices", type=count(1), default=1, help="devices (>= 1)")
    q.add_argument("--seq-len", type=count(1), help="sequence length (>= 1; default the context)")
    q.set_defaults(plan=plan_mfu)

    q = what.add_parser("compare", help="presets side by side: parameters, memory, KV cache, training days")
    q.add_argument("models", nargs="*", help="presets (default all)")
    hw_args(q)
    q.add_argument("--tokens", type=number(POSITIVE), default=300e9, help="training tokens for the days column (300B)")
    q.add_argument("--mfu", type=number(MFU), default=0.4, help="model FLOPs utilization (valid: (0, 1])")
    q.set_defaults(plan=plan_compare)

    for q in what.choices.values():
        add_json(q)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    result, text = args.plan(args)
    emit(args, result, text)
