"""Weight-only quantization: the codes against a by-hand reference, pack/unpack, the kernels against dequantized
matmuls, SQNR per layer, checkpoints that every verb loads, and the one-line refusals."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import load_checkpoint, save_model_checkpoint
from gptlab.errors import GptlabError
from gptlab.kernels import MAX_ISA
from gptlab.loader import load_model
from gptlab.quant.quantize import (
    QuantEmbedding,
    QuantLinear,
    check_record,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantization_record,
    quantize_int4,
    quantize_int8,
    quantize_model,
    sqnr_db,
    unpack_int4,
)

from .conftest import gpt2_shaped, run_cli


def test_int8_codes_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 1.0, -0.02]])
    codes, scales = quantize_int8(w)
    assert scales.tolist() == pytest.approx([1 / 127, 2 / 127])
    assert codes.tolist() == [[64, -127, 32], [127, 64, -1]]  # round(w / scale): 63.5 -> 64 (half to even: 64)


def test_int4_codes_by_hand_and_the_pack_round_trip():
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32) / 31  # one group of 32 from 0 to 1
    packed, scales, zeros = quantize_int4(w, 32)
    assert scales.dtype == zeros.dtype == torch.float16  # fp16's 11 significant bits:
    assert scales.item() == pytest.approx(1 / 15, rel=2**-11) and zeros.item() == pytest.approx(8 / 15, rel=2**-11)
    assert zeros.item() - 8 * scales.item() == 0  # the offset they store is the minimum, exactly here
    q = unpack_int4(packed)
    assert q.tolist()[0] == [round(i / 31 / scales.item()) for i in range(32)]
    assert int(packed[0, 0]) == (q[0, 0] << 4 | q[0, 1])  # even column in the high nibble
    with pytest.raises(GptlabError, match="fp16's range"):  # a group spanning 1e6 / 15 per step: no fp16 scale
        quantize_int4(torch.cat([torch.zeros(1, 31), torch.full((1, 1), 1e6)], 1), 32)
    every = torch.arange(16).repeat(4, 2)  # every code in every position
    assert torch.equal(unpack_int4(pack_int4(every)), every)


@pytest.mark.parametrize("mode,floor", [("int8", 35.0), ("int4", 15.0)])
def test_every_layer_of_a_gpt2_shaped_model_keeps_its_sqnr(mode, floor):
    model = gpt2_shaped(n_embd=128)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_model(model, mode, 64)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(floats)  # the head too (tied: it also feeds the embedding)
    for name, m in layers.items():
        assert sqnr_db(floats[name], m.dequantized()) >= floor, name


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_kernels_compute_the_dequantized_matmul(mode):
    torch.manual_seed(0)
    w, b = torch.randn(100, 256) * 0.05, torch.randn(100)  # 100 rows: the int4 kernel's padding to 16 is exercised
    layer = QuantLinear.from_weight(w, b, mode, 64)
    x = torch.randn(3, 5, 256)
    ref = F.linear(x, layer.dequantized(), b)
    # exact up to fp32 sums, or (gptlab's AVX2 kernels) up to the rounding of the activations, half a step per
    # element: int8, of max|x_row| / 32767, times sum_k |w_k|; int4, of max|x_group| / 127 per group of 64 columns,
    # times the group's sum of |codes x scale| (its offsets multiply the sums of x itself)
    if mode == "int8":
        bound = x.abs().amax(-1, keepdim=True) / 65534 * layer.dequantized().abs().sum(1)
    else:
        step = x.unflatten(-1, (4, 64)).abs().amax(-1) / 254  # [3, 5, groups]
        codes = layer.dequantized() - (layer.zeros.float() - 8 * layer.scales.float()).repeat_interleave(64, 1)
        bound = step @ codes.abs().unflatten(-1, (4, 64)).sum(-1).T
    assert ((layer(x) - ref).abs() <= bound * 1.001 + 1e-4).all()
    deq = (
        dequantize_int8(layer.qweight, layer.scales)
        if mode == "int8"
        else dequantize_int4(layer.qweight, layer.scales, layer.zeros)
    )
    idx = torch.tensor([[3, 99], [0, 50]])
    torch.testing.assert_close(layer.rows(idx), deq[idx])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_each_row_gets_the_bits_it_gets_alone_whatever_the_number_of_rows(mode):
    """gptlab's kernels serve every input, kernels.MAX_ROWS (64) rows a call, and their rows do not depend on each
    other: a request decodes the same tokens alone as in a full serving pool, and a prefill's rows are those of the
    same rows fed alone (past 16 rows the dequantized weight's GEMM used to take over, with other bits)."""
    from gptlab import kernels

    torch.manual_seed(0)
    layer = QuantLinear.from_weight(torch.randn(48, 256) * 0.05, None, mode, 64)
    layer.prepare()
    if layer._ops is None:
        pytest.skip("gptlab's kernels do not run here (no AVX2 or no C++ compiler)")
    x = torch.randn(kernels.MAX_ROWS + 36, 256)  # a call of 64 rows and one of 36
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(layer(x[: kernels.MAX_ROWS]), got[: kernels.MAX_ROWS])
        for i in (0, 17, kernels.MAX_ROWS - 1, kernels.MAX_ROWS + 35):
            assert torch.equal(layer(x[i : i + 1]), got[i : i + 1])


def int16_rows(x):
    """The kernels' activations, computed as they compute them (float32): each row rounded to int16 fixed point
    with scale xs = max|x_row| / 32767. Returns (the rounded rows, xs), float64."""
    xs = x.abs().amax(-1, keepdim=True) / 32767
    return torch.round(x * (1 / xs)).double() * xs.double(), xs.double()


def int8_groups(x, g):
    """The int4 kernel's activations, computed as it computes them (float32): each group of ``g`` columns of a row
    rounded to int8 codes with scale xs = max|x_group| / 127. Returns (the rounded rows, xs repeated over each
    group's columns), float64."""
    groups = x.view(x.size(0), -1, g)
    xs = groups.abs().amax(-1, keepdim=True) / 127
    return (torch.round(groups * (1 / xs)).double() * xs.double()).view_as(x), xs.double().expand_as(groups).reshape(
        x.shape
    )


def test_the_avx2_kernels_compute_their_scheme_eager_and_compiled():
    """gptlab's AVX2 int8 and int4 kernels against a float64 computation of their scheme (the dequantized weights;
    int8: int16 activations per row; int4: int8 activations per group), within the hand bound of that rounding
    against fp32 activations; and the same greedy tokens eager, compiled, and through PyTorch's kernels."""
    from gptlab import kernels
    from gptlab.generate import Engine, Sampling

    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512") or kernels.compiler() is None or kernels.mode() == "off":
        pytest.skip(f"gptlab's kernels need an x86 CPU with AVX2 and a C++ compiler; this CPU reports {cap}")
    ops = kernels.load()  # an AVX2 CPU with a compiler: a build that fails is a failure here, not a skip
    assert ops is not None, "gptlab's kernels did not build or load (their compiler error is printed above)"
    # the 512-bit loops' two blocks for one activation row (kernels.tuned_ops measures which is faster here)
    measured = list(ops.single_row_blocks())
    single_row_blocks = (1, 4) if kernels.isa() >= kernels.AVX512 else (measured[0],)
    found = kernels.measure_single_row_blocks(ops, rounds=1)
    assert all(rows in allowed for rows, allowed in zip(found, kernels.SINGLE_ROW_BLOCKS, strict=True))
    # and the cache the 512-bit loops prefetch into (kernels.measure_prefetch_l2): no result may depend on it
    prefetch_l2 = ops.prefetches_l2()
    assert kernels.measure_prefetch_l2(ops, rounds=1) in (False, True)
    alone = [(block, l2) for block in single_row_blocks for l2 in (False, True)]
    torch.manual_seed(0)
    for n, k in ((100, 256), (37, 100), (3, 33), (5, 4608)):  # tails of 16 columns; over 2048 columns (flushes)
        q, s = quantize_int8(torch.randn(n, k))
        w = dequantize_int8(q, s).double()
        for m in (1, 2, 7, 16, 40):  # up to kernels.MAX_ROWS: a serving pool's step
            x = torch.randn(m, k) * 3
            xh, xs = int16_rows(x)
            got = ops.int8_mm(x, q, s)
            for block, l2 in alone:  # a row alone, in either block, either prefetch: the same bits as among others
                ops.set_single_row_blocks(block, block, measured[2])
                ops.set_prefetch_l2(l2)
                assert torch.equal(ops.int8_mm(x[-1:], q, s), got[-1:])
            got = got.double()
            torch.testing.assert_close(got, xh @ w.T, rtol=1e-5, atol=1e-4)
            bound = (xs / 2) * (q.abs().double().sum(1) * s.double())[None]  # sum_k |w_k| |x_k - x̂_k|
            assert ((got - x.double() @ w.T).abs() <= bound * 1.001 + 1e-4).all()
    # groups of 32 and 64 (the 512-bit loops' transposed blocks of 16 groups for several rows, folded steps for one),
    # of 128 and 256 (one and two 64-byte steps a group), of 96 (the 256-bit loop on every CPU); rows ending in a
    # short block (192 and 576 columns in groups of 64, 96 and 576 in groups of 32: 18 groups, past a block of 16;
    # the 256-bit loop's offsets take 8)
    for n, k, g in (
        (100, 256, 64),
        (3, 576, 32),
        (5, 192, 64),
        (13, 768, 64),
        (4, 576, 64),
        (19, 96, 32),
        (9, 4096, 32),
        (7, 512, 128),
        (6, 1024, 256),
        (5, 192, 96),
    ):
        layer = QuantLinear.from_weight(torch.randn(n, k), None, "int4", g)
        w = layer.dequantized().double()
        offsets = layer.zeros.float() - 8 * layer.scales.float()
        for m in (1, 3, 11, 40):  # 11: a block of 8 activation rows and one of 3; 40: a serving pool's step
            x = torch.randn(m, k)
            x[0, :g] *= 1e-3  # a group far smaller than the row's others: its own scale keeps its precision
            xh, xs = int8_groups(x, g)
            got = ops.int4_mm(x, layer.qweight, layer.scales, layer.zeros, g)
            for block, l2 in alone:
                ops.set_single_row_blocks(block, block, measured[2])
                ops.set_prefetch_l2(l2)
                assert torch.equal(ops.int4_mm(x[-1:], layer.qweight, layer.scales, layer.zeros, g), got[-1:])
            got = got.double()
            # the codes' part uses x̂, the offsets' part the group sums of x itself
            codes = w - offsets.double().repeat_interleave(g, 1)
            tol = 1e-4 * max(1, k / 1024)  # fp32 sums of k / g group terms
            torch.testing.assert_close(got, xh @ codes.T + x.double() @ (w - codes).T, rtol=1e-5, atol=tol)
            assert ((got - x.double() @ w.T).abs() <= (xs / 2) @ codes.abs().T * 1.001 + tol).all()
    ops.set_single_row_blocks(*measured)
    ops.set_prefetch_l2(prefetch_l2)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    greedy = Sampling(temperature=0)
    idx = torch.arange(1, 33)[None]
    with torch.no_grad():
        unquantized = gpt2_shaped()(idx)[0]
    for mode in ("int8", "int4"):
        model = quantize_model(gpt2_shaped(), mode, 64)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert all(m._ops is ops for m in layers)
        ours = [c.tokens for c in Engine(model).generate_tokens(prompts, 12, greedy)]
        compiled = [c.tokens for c in Engine(model, compile=True).generate_tokens(prompts, 12, greedy)]
        with torch.no_grad():
            logits = model(idx)[0]
            for m in layers:
                m._ops = None  # PyTorch's kernels (the dequantized weights, fp32 activations)
            exact = model(idx)[0]
        theirs = [c.tokens for c in Engine(model).generate_tokens(prompts, 12, greedy)]
        assert ours == compiled, mode
        # what rounding the activations costs, against what rounding the weights costs (int8: 0.4 %; int4: 13 %)
        assert (logits - exact).norm() <= {"int8": 0.01, "int4": 0.25}[mode] * (exact - unquantized).norm(), mode
        if mode == "int8":  # int16 activations: a random model's near-even logits still give PyTorch's tokens
            assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("narrower", ["avx2", "avx512"])
def test_the_narrower_loops_also_run_under_test_on_wider_cpus(narrower):
    """A CPU takes its widest loop (AVX2, AVX-512, AVX-512 VNNI); a library built with GPTLAB_KERNELS=avx2 takes the
    256-bit loops, with avx512 the 512-bit ones without VNNI, which narrower CPUs run: the same checks, in a process
    of its own (a process loads one build)."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    wider = {"avx2": "avx512bw", "avx512": "avx512_vnni"}[narrower]
    if wider not in flags or os.environ.get("GPTLAB_KERNELS") in MAX_ISA:
        pytest.skip(f"this CPU has no {wider}: its own loop is the {narrower} one, tested above")
    test = "tests/test_quant.py::test_the_avx2_kernels_compute_their_scheme_eager_and_compiled"
    env = {**os.environ, "GPTLAB_KERNELS": narrower}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_kernel_build_that_fails_is_one_warning_or_with_required_an_error(tmp_path):
    """A compiler that fails: its error is printed once and PyTorch's kernels take over; GPTLAB_KERNELS=required
    (what CI sets) makes it an error."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernels are built only on x86 CPUs with AVX2")
    bad = tmp_path / "cxx"
    bad.write_text("#!/bin/sh\necho 'kernels.cpp:1: error: no such compiler' >&2\nexit 3\n")
    bad.chmod(0o755)
    code = "from gptlab import kernels; print(kernels.load())"
    for how, rc in (("auto", 0), ("required", 1)):
        env = {**os.environ, "CXX": str(bad), "GPTLAB_CACHE": str(tmp_path / "cache"), "GPTLAB_KERNELS": how}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == rc, done.stderr
        assert "no such compiler" in done.stderr
        if how == "auto":
            assert done.stdout.strip() == "None" and done.stderr.count("warning") == 1


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.3)])
def test_a_saved_quantized_checkpoint_loads_everywhere_with_the_same_logits(tmp_path, mode, tol):
    model = gpt2_shaped()
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        ref = model(idx)[0]
        quantize_model(model, mode, 64)
        want = model(idx)[0]
    assert isinstance(model.wte, QuantEmbedding)
    save_model_checkpoint(
        tmp_path / "q",
        model.state_dict(),
        model.config,
        {"kind": "gpt2"},
        quantization=quantization_record(mode, 64, ()),
    )
    loaded, meta = load_checkpoint(tmp_path / "q")
    assert meta["quantization"]["mode"] == mode
    with torch.no_grad():
        got = loaded(idx)[0]
        torch.testing.assert_close(got, want)  # the checkpoint is exactly the quantized model
        assert ((got - ref).norm() / ref.norm()).item() < tol
        loss = loaded(idx, idx)[1]  # a quantized head: the unfused loss path
    assert torch.isfinite(loss)
    if mode == "int4":  # fp16 scales and zeros, also from a checkpoint that stored them as fp32 (gptlab before)
        assert loaded.lm_head.scales.dtype == loaded.lm_head.zeros.dtype == torch.float16
        old = {k: v.float() if k.endswith(("scales", "zeros")) else v for k, v in model.state_dict().items()}
        save_model_checkpoint(
            tmp_path / "old", old, model.config, {"kind": "gpt2"}, quantization=quantization_record(mode, 64, ())
        )
        older, _ = load_checkpoint(tmp_path / "old")
        assert older.lm_head.scales.dtype == torch.float16
        with torch.no_grad():
            assert torch.equal(older(idx)[0], got)


def test_excluding_the_tied_head_keeps_it_float_and_tied(tmp_path):
    model = quantize_model(gpt2_shaped(), "int4", 64, exclude=("lm_head",))
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.wte.weight
    save_model_checkpoint(
        tmp_path / "q", model.state_dict(), model.config, {"kind": "gpt2"},
        quantization=quantization_record("int4", 64, ("lm_head",)),
    )  # fmt: skip
    loaded, _ = load_checkpoint(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.wte.weight


def test_an_int8_head_under_int4_blocks_saves_and_loads_as_quantized(tmp_path):
    """--head-mode int8 (llama.cpp's 4-bit files keep their output matrix at 8 bits): the tied head and embedding
    hold int8 codes by hand (round(w / (max|row| / 127))), the blocks int4, and the checkpoint loads back the same."""
    from .conftest import random_gpt2_checkpoint

    random_gpt2_checkpoint(tmp_path / "f", 64)
    r = run_cli("quantize", str(tmp_path / "f"), "--mode", "int4", "--group-size", "32", "--head-mode", "int8",
                "--out-dir", str(tmp_path / "q"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    float_model, _ = load_checkpoint(tmp_path / "f")
    loaded, meta = load_checkpoint(tmp_path / "q")
    assert meta["quantization"] == {"mode": "int4", "group_size": 32, "exclude": [], "head_mode": "int8"}
    head = loaded.lm_head
    assert isinstance(head, QuantLinear) and head.mode == "int8" and isinstance(loaded.wte, QuantEmbedding)
    w = float_model.lm_head.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(head.dequantized(), torch.round(w / scale).clamp(-127, 127) * scale)
    blocks = [m for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert blocks and all(m.mode == "int4" and m.group_size == 32 for m in blocks)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = quantize_model(float_model, "int4", 32, head_mode="int8")(idx)[0]
        torch.testing.assert_close(loaded(idx)[0], want)
    bad = run_cli("quantize", str(tmp_path / "f"), "--mode", "int4", "--head-mode", "int2", "--out-dir",
                  str(tmp_path / "q2"))  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("gptlab: error:") and not (tmp_path / "q2").exists()
    with pytest.raises(GptlabError, match="damaged"):
        check_record({"mode": "int4", "group_size": 32, "exclude": [], "head_mode": "int3"})
    both = run_cli("quantize", str(tmp_path / "f"), "--mode", "int4", "--head-mode", "int8", "--exclude", "lm_head",
                   "--out-dir", str(tmp_path / "q3"))  # fmt: skip
    assert both.returncode == 2 and "drop one of them" in both.stderr and not (tmp_path / "q3").exists()


def test_the_cli_quantizes_and_sample_loads_it(tmp_path):
    from .conftest import random_gpt2_checkpoint

    random_gpt2_checkpoint(tmp_path / "f", 64)
    r = run_cli("quantize", str(tmp_path / "f"), "--mode", "int8", "--out-dir", str(tmp_path / "q"), "--json")
    assert r.returncode == 0, r.stderr
    s = run_cli("sample", str(tmp_path / "q"), "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "0")
    f = run_cli("sample", str(tmp_path / "f"), "--quantize", "int8", "--prompt", "Hi", "--max-new-tokens", "4",
                "--temperature", "0")  # fmt: skip
    assert s.returncode == 0 and f.returncode == 0 and s.stdout.split("\n")[0] == f.stdout.split("\n")[0]
    again = run_cli("quantize", str(tmp_path / "f"), "--mode", "int8", "--out-dir", str(tmp_path / "q"))
    assert again.returncode == 2 and again.stderr.startswith("gptlab: error:") and "exists" in again.stderr
    twice = run_cli("quantize", str(tmp_path / "q"), "--mode", "int4", "--out-dir", str(tmp_path / "q2"))
    assert twice.returncode == 2 and "already quantized" in twice.stderr
    on_top = load_model
    with pytest.raises(Exception, match="already quantized"):
        on_top(tmp_path / "q", "cpu", quantize="int4")


# ------------------------------------------------------------------ GGUF export, checked by llama.cpp itself


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_a_gguf_export_decodes_the_same_greedy_tokens_in_llama_cpp(tmp_path, ftype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from gptlab.generate.engine import Engine, Sampling
    from gptlab.interop.llama_peer import open_llama

    from .conftest import random_gpt2_checkpoint

    random_gpt2_checkpoint(tmp_path / "f", 96)
    r = run_cli("convert", str(tmp_path / "f"), str(tmp_path / "m.gguf"), "--gguf-type", ftype, "--json")
    assert r.returncode == 0, r.stderr
    loaded = load_model(tmp_path / "f", "cpu")
    prompt = "Hello world, the king"
    ids = loaded.tokenizer.encode(prompt)
    ours = Engine(loaded.model).generate_tokens([ids], 24, Sampling(temperature=0))[0].tokens
    llm = open_llama(str(tmp_path / "m.gguf"), n_ctx=96, n_threads=1)  # safe on AMX CPUs (q8_0 batches crash there)
    assert llm.tokenize(prompt.encode(), add_bos=False) == ids  # the vocabulary and merges went in intact
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == len(ours):
            break
    if ftype == "f32":
        assert theirs == ours
    else:  # q8_0 rounds the weights: the first tokens still agree on this model
        assert theirs[:4] == ours[:4]
    again = run_cli("convert", str(tmp_path / "f"), str(tmp_path / "m.gguf"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_gguf_refuses_what_llama_cpps_gpt2_cannot_hold(tmp_path):
    model = gpt2_shaped(norm="post")
    save_model_checkpoint(tmp_path / "g1", model.state_dict(), model.config, {"kind": "gpt2"})
    r = run_cli("convert", str(tmp_path / "g1"), str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "post-norm" in r.stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("fmt", ["gptlab", "hf"])
def test_saving_a_loaded_quantized_model_round_trips_in_every_format(tmp_path, mode, fmt):
    """``gptlab.load(quantized).save(out)`` and ``gptlab convert Q --to hf``: a gptlab checkpoint keeps the codes
    (it loads back quantized, logits identical); a Hugging Face folder holds the dequantized weights, which
    transformers loads (logits equal to a float model holding the same dequantized weights)."""
    import gptlab

    from .conftest import random_gpt2_checkpoint

    random_gpt2_checkpoint(tmp_path / "f", 64)
    r = run_cli("quantize", str(tmp_path / "f"), "--mode", mode, "--out-dir", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    lm = gptlab.load(tmp_path / "q", device="cpu")
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        want = lm.model(idx)[0]
    out = lm.save(tmp_path / "saved", format=fmt)
    if fmt == "gptlab":
        back = gptlab.load(out, device="cpu")
        assert back.model.quantization["mode"] == mode
        with torch.no_grad():
            torch.testing.assert_close(back.model(idx)[0], want)
        return
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    float_model = gptlab.load(out, device="cpu").model  # the same folder through gptlab's own HF reader
    with torch.no_grad():
        theirs = hf(idx).logits
        torch.testing.assert_close(theirs, float_model(idx)[0], atol=1e-4, rtol=1e-4)
        # the kernels round activations (int8: to int16 per row; int4: to int8 per group); nothing else
        assert ((theirs - want).norm() / want.norm()).item() < {"int8": 0.02, "int4": 0.05}[mode]
    r = run_cli("convert", str(tmp_path / "q"), "--to", "hf", "--out-dir", str(tmp_path / "cli"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "dequantized" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # and to GGUF: dequantized with the same notice; the f32 file holds exactly the dequantized weights
    r = run_cli("convert", str(tmp_path / "q"), str(tmp_path / "q.gguf"))
    assert r.returncode == 0 and "dequantized" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    gguf = pytest.importorskip("gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    embd = np.asarray(tensors["token_embd.weight"].data).reshape(float_model.wte.weight.shape)
    np.testing.assert_array_equal(embd, float_model.wte.weight.detach().numpy())


def test_the_fp32_kernel_computes_linear_for_decode_steps():
    """gptlab's fp32 kernel (eager decode steps on an AVX-512 CPU) against a float64 ``x @ w.T + b`` on every row
    count it serves, every block shape (each the probe may choose for one row, up to 8 rows, more) and every count
    of weight rows a block can be left with; each row's result the same bits alone as among the others (a decode
    step's rows are other requests); and its guard: gradients, autocast and more rows (outside ``row_invariant``)
    go to ``F.linear``."""
    from gptlab import kernels

    if kernels.isa() < kernels.AVX512:
        assert kernels.f32_linear(torch.randn(2, 16), torch.randn(3, 16), None) is None  # F.linear's, not a detour
        pytest.skip("the fp32 kernel needs an x86 CPU with AVX-512 and a C++ compiler")
    torch.manual_seed(0)
    ops = kernels.tuned_ops()
    measured, prefetch_l2 = list(ops.single_row_blocks()), ops.prefetches_l2()
    with torch.no_grad():
        for n, k in ((37, 100), (64, 768), (3, 16), (13, 3072)):
            x, w, b = torch.randn(kernels.F32_MAX_ROWS, k), torch.randn(n, k), torch.randn(n)
            for bias in (b, None):
                ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
                alone = torch.cat([kernels.f32_linear(x[i : i + 1], w, bias) for i in range(len(x))])
                torch.testing.assert_close(alone.double(), ref, rtol=1e-5, atol=1e-4)
                for m in range(1, kernels.F32_MAX_ROWS + 1):
                    assert torch.equal(kernels.f32_linear(x[:m], w, bias), alone[:m]), (n, k, m)
                for block, l2 in itertools.product(kernels.SINGLE_ROW_BLOCKS[2], (False, True)):
                    ops.set_single_row_blocks(*measured[:2], block)  # a row alone in each block the probe may
                    ops.set_prefetch_l2(l2)  # choose, either prefetch
                    assert torch.equal(kernels.f32_linear(x[-1:], w, bias), alone[-1:]), (n, k, block)
                ops.set_single_row_blocks(*measured)
                ops.set_prefetch_l2(prefetch_l2)
        x3, w3 = torch.randn(2, 3, 64), torch.randn(5, 64)  # leading dimensions kept
        torch.testing.assert_close(kernels.f32_linear(x3, w3, None), F.linear(x3, w3), rtol=1e-5, atol=1e-4)
        assert kernels.f32_linear(torch.randn(kernels.F32_MAX_ROWS + 1, 16), torch.randn(3, 16), None) is None
        with kernels.row_invariant():  # any rows (the packed prefill): several tiles of rows (84 at K = 3,072)
            x, w = torch.randn(300, 3072), torch.randn(13, 3072)
            many = kernels.f32_linear(x, w, None)
            assert many is not None and torch.equal(many[:64], kernels.f32_linear(x[:64], w, None))
            torch.testing.assert_close(many.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)
        assert kernels.f32_linear(x, w, None) is None  # (outside it, past 64 rows: MKL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.f32_linear(x, w, b) is None
    assert kernels.f32_linear(x, w.requires_grad_(), b) is None  # training: autograd's matmul


def test_a_compiled_decode_step_of_several_rows_takes_the_fp32_kernel():
    """Inside ``torch.compile`` a product of 2 to 64 rows (a compiled decode step of several sequences) is gptlab's
    fp32 kernel too: the same bits as the eager step's (MKL's sgemm, which the compiled step used before, sums in
    another order and reads the weights at half the speed: docs/benchmarks.md); one row stays inductor's fused loop,
    more than 64 rows MKL's."""
    from gptlab import kernels
    from gptlab.layers import Linear

    if kernels.isa() < kernels.AVX512:
        pytest.skip("the fp32 kernel needs an x86 CPU with AVX-512 and a C++ compiler")
    torch.manual_seed(0)
    layer = Linear(768, 300).eval()
    compiled = torch.compile(layer, dynamic=False, fullgraph=True)
    with torch.no_grad():
        for m in (2, 8, kernels.F32_MAX_ROWS):
            x = torch.randn(m, 1, 768)
            got = compiled(x)
            assert torch.equal(got, kernels.f32_linear(x, layer.weight, layer.bias)), m
            ref = x.double() @ layer.weight.double().T + layer.bias.double()
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
        x = torch.randn(kernels.F32_MAX_ROWS + 1, 768)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)


def test_the_decode_attention_kernel_computes_sdpa_over_the_admitted_slots():
    """gptlab's decode-step attention against float64 SDPA with the same boolean mask, for grouped-query and plain
    heads, head sizes it serves (multiples of 8, a 64-channel block and a remainder), key/value views of a longer
    cache and masks from a real KVCache (left padding, per-row slots); each row's result the same bits alone as in
    the batch and whatever the slots past its mask hold or how many there are (a compiled step's cache is rounded
    up, a pool's rows are other requests); and its guard: gradients, other dtypes and more queries go to SDPA."""
    from gptlab import kernels
    from gptlab.config import GPTConfig
    from gptlab.kv_cache import KVCache

    if not kernels.have_kernels():
        pytest.skip("gptlab's kernels need an x86 CPU with AVX2 and a C++ compiler")
    torch.manual_seed(0)
    with torch.no_grad():
        for B, H, Hkv, L, D in ((1, 12, 12, 256, 64), (3, 9, 3, 77, 64), (2, 4, 1, 5, 8), (2, 8, 2, 300, 136)):
            q = torch.randn(B, H, 1, D)
            kf, vf = torch.randn(B, Hkv, L + 9, D), torch.randn(B, Hkv, L + 9, D)
            k, v = kf[:, :, :L], vf[:, :, :L]  # a view of the first L slots, as a pool's
            mask = torch.rand(B, 1, 1, L) < 0.6
            mask[..., L // 2] = True
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
            y = kernels.decode_attention(q, k, v, mask)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
            for b in range(B):
                alone = kernels.decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1])
                assert torch.equal(alone, y[b : b + 1]), (B, H, L, D, b)
            junk_k, junk_v = kf.clone(), vf.clone()  # other values in the slots the mask refuses, and 9 more of them
            junk_k[:, :, :L][~mask[:, 0, 0, None, :, None].expand_as(k)] = 1e4
            junk_v[:, :, L:] = float("nan")
            longer = F.pad(mask, (0, 9))
            assert torch.equal(kernels.decode_attention(q, junk_k, junk_v, longer), y)
        cfg = GPTConfig(n_layer=1, n_head=4, n_embd=64, n_kv_head=2, block_size=32)
        cache = KVCache(cfg, 3, 32, pad=torch.tensor([0, 3, 7]))
        _, mask = cache.positions_and_mask(torch.tensor([[9], [20], [7]]))  # the last row: a padding query
        q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 32, 16), torch.randn(3, 2, 32, 16)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(kernels.decode_attention(q, k, v, mask).double(), ref, rtol=1e-5, atol=1e-6)
        assert kernels.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask) is None
        assert kernels.decode_attention(torch.randn(3, 4, 2, 16), k, v, mask.expand(3, 1, 2, 32)) is None
        assert kernels.decode_attention(torch.randn(3, 4, 1, 12), k[..., :12], v[..., :12], mask) is None
    assert kernels.decode_attention(q.requires_grad_(), k, v, mask) is None  # training: autograd's SDPA
