"""`gptlab scale`: sweeps train, fit and write their outputs; a re-run skips finished runs and resumes an unfinished
one, also after SIGKILL; IsoFLOP budgets set each run's tokens; fitted constants feed `gptlab plan`; bad sweeps are
clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gptlab.checkpoint import list_checkpoints
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.plan.scaling import HOFFMANN
from gptlab.scale.analysis import fit_rows
from gptlab.scale.fit import fit_power_law
from gptlab.scale.sweep import Sweep, run_sweep

pytestmark = pytest.mark.slow  # every test here trains several runs

TRAIN = dict(
    batch_size=8,
    block_size=32,
    eval_interval=10,
    eval_iters=2,
    final_eval_tokens=2000,
    threads=1,
    device="cpu",
    log_interval=5,
    warmup_iters=2,
    lr=3e-3,
)
SHAPE = dict(width_per_layer=16, head_dim=8)


def sweep(data, out, **kw):
    return Sweep(data=str(data), out_dir=str(out), train=TRAIN, **{"depths": [1, 2, 3], **SHAPE, **kw})


def test_tiny_sweep_fits_resumes_and_skips(char_data, tmp_path):
    out = tmp_path / "sweep"
    r = run_sweep(sweep(char_data, out, tokens=[8 * 32 * 20]))
    assert [x["n_embd"] for x in r["runs"]] == [16, 32, 48] and all(x["tokens"] == 5120 for x in r["runs"])
    for f in ("results.csv", "results.json", "fits.json", "loss_vs_n.png", "predicted_vs_actual.png", "report.md"):
        assert (out / f).stat().st_size > 0
    fits = json.loads((out / "fits.json").read_text())
    ref = fit_power_law([x["non_embedding"] for x in r["runs"]], [x["final_val_loss"] for x in r["runs"]])
    assert fits["power_law"]["params"]["alpha"] == pytest.approx(ref.params["alpha"])
    lo, hi = fits["power_law"]["ci95"]["alpha"]  # 3 sizes: a t-interval with 1 degree of freedom, wide, not zero
    assert lo < fits["power_law"]["params"]["alpha"] < hi and hi - lo > 1e-3
    h = fits["held_out"]
    assert h["actual_loss"] == r["runs"][-1]["final_val_loss"] and h["fit_on"] == 2
    assert "0.076" in (out / "report.md").read_text()  # Kaplan's exponent beside ours
    # a re-run skips finished runs; an unfinished one (no summary.json) resumes from its checkpoints
    stamp = os.stat(out / "d1" / "summary.json").st_mtime_ns
    (out / "d3" / "summary.json").unlink()
    again = run_sweep(sweep(char_data, out, tokens=[8 * 32 * 20]))
    assert os.stat(out / "d1" / "summary.json").st_mtime_ns == stamp
    assert json.loads((out / "d3" / "summary.json").read_text())["resumed_from"] == 20
    assert [x["final_val_loss"] for x in again["runs"]] == [x["final_val_loss"] for x in r["runs"]]
    with pytest.raises(GptlabError, match="started with other settings"):
        run_sweep(sweep(char_data, out, tokens=[8 * 32 * 20], head_dim=16))
    # a second sweep, of explicit shapes, fits its runs together with the first sweep's
    both = run_sweep(
        Sweep(
            data=str(char_data),
            out_dir=str(tmp_path / "narrow"),
            train=TRAIN,
            tokens=[8 * 32 * 20],
            shapes=[[1, 8], [2, 8], [1, 24]],
            head_dim=8,
            include=[str(out)],
        )
    )
    assert [(r["n_layer"], r["n_embd"]) for r in both["runs"][:3]] == [(1, 8), (2, 8), (1, 24)]  # by size
    assert [r["name"] for r in both["runs"]] == ["l1w8", "l2w8", "l1w24", "sweep/d1", "sweep/d2", "sweep/d3"]
    assert both["fits"]["held_out"]["fit_on"] == 5
    assert both["fits"]["held_out"]["actual_loss"] == r["runs"][-1]["final_val_loss"]  # the widest model overall
    with pytest.raises(GptlabError, match="no results.json"):
        run_sweep(
            sweep(char_data, tmp_path / "other", tokens=[8 * 32 * 20], width_per_layer=8, include=[str(tmp_path)])
        )


def test_sigkilled_sweep_resumes_without_rerunning_finished_models(char_data, tmp_path):
    out = tmp_path / "killed"
    recipe = tmp_path / "sweep.toml"
    recipe.write_text(
        f'data = "{char_data}"\nout = "{out}"\ndepths = [1, 2, 3]\ntokens = [{8 * 32 * 200}]\n'
        f"width_per_layer = 16\nhead_dim = 8\n[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TRAIN.items())
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptlab", "scale", "--sweep", str(recipe), "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list_checkpoints(out / "d2"):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its second run checkpointed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "d1" / "summary.json").exists() and not (out / "d3" / "summary.json").exists()
    stamp = os.stat(out / "d1" / "summary.json").st_mtime_ns
    r = run_sweep(Sweep.from_sources(recipe))
    assert os.stat(out / "d1" / "summary.json").st_mtime_ns == stamp  # not re-run
    assert json.loads((out / "d2" / "summary.json").read_text())["resumed_from"] > 0  # resumed, not restarted
    assert len(r["runs"]) == 3 and (out / "report.md").exists()


def test_isoflop_sweep_in_parallel_processes(char_data, tmp_path):
    out = tmp_path / "iso"
    budgets = [2e9, 4e9]
    r = run_sweep(sweep(char_data, out, flops=budgets, jobs=2))
    per_step = 8 * 32
    assert {x["budget"] for x in r["runs"]} == set(budgets)
    for x in r["runs"]:  # each size gets C / 6N tokens, rounded to whole steps
        assert x["tokens"] == round(x["budget"] / (6 * x["params"]) / per_step) * per_step
        assert (out / x["name"] / "log.txt").exists()  # ran in a child process
    fits = json.loads((out / "fits.json").read_text())
    # real runs this small need not bracket an optimum; whichever way they came out, each budget must be kept
    # exactly when its lowest loss is at an interior size, and skipped (or, if none is kept, the error) otherwise
    iso = fits.get("isoflop", {})
    interior = {}
    for c in budgets:
        rows = sorted((x for x in r["runs"] if x["budget"] == c), key=lambda x: x["params"])
        best = min(range(len(rows)), key=lambda i: rows[i]["final_val_loss"])
        interior[c] = 0 < best < len(rows) - 1
    kept = {b["compute"] for b in iso.get("budgets", [])}
    skipped = {b["compute"] for b in iso.get("skipped", [])}
    if any(interior.values()):
        assert kept == {c for c in budgets if interior[c]} and skipped == {c for c in budgets if not interior[c]}
    else:
        assert not kept and "no budget brackets its optimum" in fits["isoflop_error"]
    assert "chinchilla" in fits and (out / "report.md").exists()
    # the fitted constants feed the planner: its own compute-optimal split comes first
    assert main(["plan", "scaling", "--compute", "1e12", "--law", str(out / "fits.json"), "--json"]) == 0


def test_token_budget_grid_fits_data_law_and_chinchilla():
    """fit_rows on runs drawn from a known L(N, D): L(D) of the largest model has the law's β and floor
    E + A/N^α, and the joint fit recovers the law."""
    rows = []
    for depth, n in enumerate((1e6, 3e6, 1e7, 3e7, 1e8), 1):
        for d in (2e8, 8e8, 3.2e9, 1.28e10):
            rows.append(
                {
                    "name": f"t{d:.3g}-d{depth}",
                    "budget": d,
                    "depth": depth,
                    "params": n,
                    "non_embedding": n,
                    "tokens": d,
                    "compute": 6 * n * d,
                    "final_val_loss": HOFFMANN.loss(n, d),
                }
            )
    fits = fit_rows(rows)
    floor = HOFFMANN.E + HOFFMANN.A / 1e8**HOFFMANN.alpha
    assert fits["data_law_with_E"]["params"]["alpha"] == pytest.approx(HOFFMANN.beta, abs=0.01)
    assert fits["data_law_with_E"]["params"]["E"] == pytest.approx(floor, rel=0.01)
    assert fits["chinchilla"]["params"]["alpha"] == pytest.approx(HOFFMANN.alpha, abs=0.01)
    assert fits["chinchilla"]["params"]["E"] == pytest.approx(HOFFMANN.E, abs=0.02)
    assert fits["held_out"]["fit_on"] == 4  # L(N) at the largest budget, all but the largest model


def test_plan_uses_fitted_constants(tmp_path, capsys):
    fits = tmp_path / "fits.json"
    p = {"E": HOFFMANN.E, "A": HOFFMANN.A, "B": HOFFMANN.B, "alpha": HOFFMANN.alpha, "beta": HOFFMANN.beta}
    fits.write_text(json.dumps({"chinchilla": {"params": p}}))
    assert main(["plan", "scaling", "--compute", "5.76e23", "--law", str(fits), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["allocations"]
    assert rows[0]["allocation"] == "fitted"
    assert rows[0]["params"] == pytest.approx(HOFFMANN.optimal(5.76e23)[0])
    assert rows[0]["loss_chinchilla"] == pytest.approx(HOFFMANN.loss(*HOFFMANN.optimal(5.76e23)))
    fits.write_text(json.dumps({"power_law": {}}))
    assert main(["plan", "scaling", "--compute", "1e20", "--law", str(fits)]) == 2
    assert "holds no L(N, D) constants" in capsys.readouterr().err


def test_bad_sweeps_are_clear_errors(char_data, tmp_path):
    with pytest.raises(GptlabError, match="size list is empty"):
        sweep(char_data, tmp_path / "s", depths=[])
    with pytest.raises(GptlabError, match="at least 3 distinct positive sizes"):
        sweep(char_data, tmp_path / "s", depths=[1, 2])
    with pytest.raises(GptlabError, match="depths .* or shapes, not both"):
        sweep(char_data, tmp_path / "s", shapes=[[1, 16], [2, 16], [1, 32]])
    with pytest.raises(GptlabError, match="give at least"):
        run_sweep(sweep(char_data, tmp_path / "s", tokens=[100]))
    with pytest.raises(GptlabError, match="too small for these models"):
        run_sweep(sweep(char_data, tmp_path / "s", flops=[1e6]))
    with pytest.raises(GptlabError, match="not both"):
        sweep(char_data, tmp_path / "s", tokens=[1e6], flops=[1e12])
    with pytest.raises(GptlabError, match="not a multiple of head_dim"):
        run_sweep(sweep(char_data, tmp_path / "s", tokens=[10_000], width_per_layer=12))
    with pytest.raises(GptlabError, match="needs `data`"):
        Sweep.from_sources(None, out_dir="x")
