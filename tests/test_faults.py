"""Crashes and full disks: SIGKILL at every filesystem mutation of ``prepare`` and at points through a training run
(checkpoint writes, pruning, metrics appends) and at random times; a real full disk (a small tmpfs, as root) and an
injected ENOSPC in the middle of a metrics line. Each asserts that no data is lost and that the next run recovers:
the dataset is the old or the new one, a resumed run's losses equal the uninterrupted run's, nothing is left behind.
"""

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab import checkpoint
from gptlab.cli import main
from gptlab.data.prepare import prepare
from gptlab.metrics import read_rows

from .conftest import ENV, REPO, synthetic_text
from .fault_runner import train_argv

pytestmark = pytest.mark.slow


def run_scenario(name, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_runner.py"), name, str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["cases"]


def test_prepare_killed_at_every_write_and_rename_loses_nothing(tmp_path):
    cases = run_scenario("prepare", tmp_path)
    assert len(cases) >= 40
    for c in cases:
        assert c["rc"] == -9, c  # the kill really happened at event k
        allowed = {"old", "new", "missing"} if c["no_exchange"] else {"old", "new"}
        assert c["after_kill"] in allowed, c  # with the atomic exchange a dataset is always in place
        assert c["recovery_rc"] == 0 and c["after_recovery"] == "new" and c["leftovers"] == [], c
    # the fallback (two renames) really was exercised across the gap it leaves
    assert any(c["after_kill"] == "missing" for c in cases if c["no_exchange"])


def test_training_killed_anywhere_resumes_to_the_same_losses(tmp_path):
    cases = run_scenario("train", tmp_path)
    assert sum(c["how"] == "event" for c in cases) >= 12
    for c in cases:
        assert c["recovery_rc"] == 0, c
        assert c["losses_equal"] and c["checkpoints_ok"] and c["leftovers"] == [], c
    assert any(c["resumed"] for c in cases) and any(not c["resumed"] for c in cases)
    assert any(c["how"] == "time" and c["rc"] == -9 for c in cases)
    resumes = [c for c in cases if c["how"] == "resume-event"]
    assert len(resumes) == 8 and all(c["rc"] == -9 and c["history_kept"] for c in resumes), resumes
    windows = [c for c in cases if c["how"] == "window"]  # each named window was really hit
    assert [c["at"] for c in windows] == ["checkpoint-rename", "metrics-fsync", "metrics-rename"], windows
    assert all(c["rc"] == -9 and c["history_kept"] for c in windows), windows


def test_quantize_and_convert_killed_at_every_mutation_leave_no_partial_output(tmp_path):
    """Every mutation of ``quantize`` and of ``convert`` to a Hugging Face folder and to a GGUF file, the final
    rename included: after the kill the output is absent or complete; the next run of the same command removes what
    the killed one left (temporary siblings) and writes the complete output."""
    from .conftest import random_gpt2_checkpoint

    random_gpt2_checkpoint(tmp_path / "model", 32)
    cases = run_scenario("outputs", tmp_path)
    for name in ("quantize", "convert-hf", "convert-gguf"):
        mine = [c for c in cases if c["command"] == name]
        assert len(mine) >= 5, (name, len(mine))
        assert any(c["after_kill"] == "absent" and c["left_by_kill"] for c in mine), name  # leftovers were made
        assert any(c["after_kill"] == "complete" for c in mine), name  # a kill after the final rename
    for c in cases:
        assert c["rc"] == -9 and c["after_kill"] in ("absent", "complete"), c
        assert c["recovery_rc"] == 0 and c["after_recovery"] == "complete", c
        # a kill after the final rename can only leave the released lock's file (harmless: a lock dies with its
        # process); anything else is removed by the next run
        stale = (
            [f for f in c["leftovers"] if not f.endswith(".lock")] if c["after_kill"] == "complete" else c["leftovers"]
        )
        assert stale == [], c


def _train_argv(data, run, *extra):
    return train_argv(data, run, "--log-interval", "1", *extra)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "c.txt").write_text(synthetic_text(1500))
    prepare([str(root / "c.txt")], root / "data", tokenizer="char", progress=False)
    assert main(_train_argv(root / "data", root / "ref")) == 0
    return root


def losses(run):
    return {r["step"]: r["loss"] for r in read_rows(run / "metrics.jsonl") if "loss" in r}


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error_line(capsys, rc):
    err = capsys.readouterr().err
    lines = [seg for line in err.splitlines() for seg in [line.rsplit("\r", 1)[-1]] if seg.strip()]
    assert rc == 2 and lines[-1].startswith("gptlab: error: no space left on the device") and "Traceback" not in err
    return lines[-1]


def test_a_full_disk_stops_cleanly_and_the_run_resumes_once_space_is_freed(small_data, tmp_path, capsys):
    """A 2 MB disk holds the first checkpoint (1.24 MB: weights and AdamW moments) but not a second one beside it."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        run = disk / "run"
        one_error_line(capsys, main(_train_argv(small_data / "data", run)))
        done = checkpoint.list_checkpoints(run)
        assert [p.name for p in done] == ["step-0000004"]  # the complete one survives, verified below
        state = checkpoint.read_state(done[0])
        checkpoint.load_weights(done[0], state)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial folder
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)  # the user frees space
        assert main(_train_argv(small_data / "data", run, "--resume")) == 0
        assert losses(run) == losses(small_data / "ref")

        # prepare on a full disk: an error line, the earlier dataset intact, nothing half-written beside it
        before = {p.name: p.read_bytes() for p in (small_data / "data").iterdir()}
        prepare([str(small_data / "c.txt")], disk / "ds", tokenizer="char", progress=False)
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        big = tmp_path / "big.txt"
        big.write_text(synthetic_text(60000))
        capsys.readouterr()
        one_error_line(capsys, main(["prepare", str(big), "--out-dir", str(disk / "ds"), "--tokenizer", "char"]))
        assert sorted(p.name for p in disk.iterdir()) == ["ds", "run"]
        assert {p.name: p.read_bytes() for p in (disk / "ds").iterdir()} == before


def test_enospc_inside_a_metrics_line_leaves_a_torn_tail_that_resume_repairs(small_data, tmp_path, capsys, monkeypatch):
    import gptlab.metrics as metrics_mod

    run = tmp_path / "run"
    real_write, calls = os.write, [0]

    def failing_write(fd, data):
        calls[0] += 1
        if calls[0] == 6:  # step 6's loss row: half of it reaches the disk, then the disk is full
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(metrics_mod.os, "write", failing_write)
    one_error_line(capsys, main(_train_argv(small_data / "data", run)))
    monkeypatch.undo()
    text = (run / "metrics.jsonl").read_text()
    assert not text.endswith("\n")  # the torn line is really there
    assert main(_train_argv(small_data / "data", run, "--resume")) == 0
    assert losses(run) == losses(small_data / "ref")
    assert all(line.startswith("{") and line.endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_second_run_on_the_same_folder_is_refused(small_data, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "gptlab"] + [a for a in _train_argv(small_data / "data", run) if a != "--json"]
    argv[argv.index("--max-iters") + 1] = "400"
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = 60
        import time

        t0 = time.time()
        while not (run / ".lock").exists() and time.time() - t0 < deadline:
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "gptlab"] + _train_argv(small_data / "data", run, "--resume"),
            env=ENV,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert second.returncode == 2 and "is in use by another gptlab process" in second.stderr
        assert f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
        prep = subprocess.run(
            [
                sys.executable,
                "-m",
                "gptlab",
                "prepare",
                str(small_data / "c.txt"),
                "--out-dir",
                str(run),
                "--tokenizer",
                "char",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert prep.returncode == 2 and "not a gptlab dataset" in prep.stderr
    finally:
        first.kill()
        first.wait()
