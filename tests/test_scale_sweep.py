"""`gptlab scale`: a tiny sweep trains, fits and writes its outputs; a re-run skips finished runs and resumes an
unfinished one; bad sweeps are clear errors."""

import json
import os

import pytest

from gptlab.errors import GptlabError
from gptlab.scale.fit import fit_power_law
from gptlab.scale.sweep import run_sweep

from .test_train import char_data  # noqa: F401 - fixture

KW = dict(batch_size=8, block_size=32, eval_interval=10, eval_iters=2, final_eval_tokens=2000, threads=1,
          device="cpu", log_interval=5, warmup_iters=2, lr=3e-3)


def test_tiny_sweep_fits_resumes_and_skips(char_data, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    r = run_sweep(None, str(char_data), str(out), [1, 2, 3], 8 * 32 * 20, width_per_layer=16, head_dim=8, **KW)
    assert [x["n_embd"] for x in r["runs"]] == [16, 32, 48] and all(x["tokens"] == 5120 for x in r["runs"])
    for f in ("results.csv", "results.json", "fits.json", "loss_vs_n.png"):
        assert (out / f).stat().st_size > 0
    fits = json.loads((out / "fits.json").read_text())
    ref = fit_power_law([x["non_embedding"] for x in r["runs"]], [x["final_val_loss"] for x in r["runs"]])
    assert fits["power_law"]["params"]["alpha"] == pytest.approx(ref.params["alpha"])
    h = fits["held_out"]
    assert h["actual_loss"] == r["runs"][-1]["final_val_loss"] and h["fit_on"] == 2
    # a re-run skips finished runs; an unfinished one (no summary.json) resumes from its checkpoints
    stamp = os.stat(out / "d1" / "summary.json").st_mtime_ns
    (out / "d3" / "summary.json").unlink()
    again = run_sweep(None, str(char_data), str(out), [1, 2, 3], 8 * 32 * 20, width_per_layer=16, head_dim=8, **KW)
    assert os.stat(out / "d1" / "summary.json").st_mtime_ns == stamp
    assert [x["final_val_loss"] for x in again["runs"]] == [x["final_val_loss"] for x in r["runs"]]


def test_bad_sweeps_are_clear_errors(char_data, tmp_path):  # noqa: F811
    with pytest.raises(GptlabError, match="at least 3 distinct positive depths"):
        run_sweep(None, str(char_data), str(tmp_path / "s"), [1, 2], 10_000, **KW)
    with pytest.raises(GptlabError, match="give at least"):
        run_sweep(None, str(char_data), str(tmp_path / "s"), [1, 2, 3], 100, **KW)
    with pytest.raises(GptlabError, match="not a multiple of head_dim"):
        run_sweep(None, str(char_data), str(tmp_path / "s"), [1, 2, 3], 10_000, width_per_layer=12, head_dim=8, **KW)
