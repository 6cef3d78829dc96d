"""Crash injection for gptlab's writers: run a command in a forked child that SIGKILLs itself at its k-th
filesystem mutation (``write``, ``fsync``, ``mkdir``, ``rename``/``replace``, the atomic exchange, ``unlink``,
``rmdir``, ``rmtree``; a killed ``write`` first writes half its bytes), for every k, then run the recovery command
and report what was on disk after the kill and after the recovery.

Used by ``tests/test_faults.py`` as ``python tests/fault_runner.py SCENARIO WORKDIR``; prints one JSON object. The
parent imports gptlab but runs no torch operation, so forking it is safe; each child starts its own threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

EVENTS = [
    ("os", "replace"),
    ("os", "rename"),
    ("os", "fsync"),
    ("os", "write"),
    ("os", "mkdir"),
    ("os", "unlink"),
    ("os", "rmdir"),
    ("shutil", "rmtree"),
    ("gptlab.files", "_exchange"),
]


def describe(name: str, args: tuple) -> str:
    """One line for a mutation: its name and the paths it touches (a file descriptor as the path it is open on)."""
    parts = [name]
    for a in args:
        if isinstance(a, int) and name in ("write", "fsync"):
            with contextlib.suppress(OSError):
                a = os.readlink(f"/proc/self/fd/{a}")  # not a mutation: not counted
        if isinstance(a, (str, os.PathLike)):
            parts.append(str(a))
    return " ".join(parts)


def arm(kill_at: int, count_file: Path | None = None, no_exchange: bool = False, kill_on: str | None = None) -> None:
    """Patch every mutation to count itself and SIGKILL the process at number ``kill_at`` (0: never), or at the
    first mutation whose :func:`describe` line matches the regular expression ``kill_on`` (a named window, such as
    the final rename of a checkpoint folder)."""
    n = [0]
    pattern = re.compile(kill_on) if kill_on else None
    for mod_name, name in EVENTS:
        mod = importlib.import_module(mod_name)
        real = getattr(mod, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            if _name == "_exchange" and no_exchange:
                return False
            n[0] += 1
            if count_file is not None:
                count_file.write_text(str(n[0]))  # plain open/write: not counted
            if n[0] == kill_at or (pattern is not None and pattern.search(describe(_name, a))):
                if _name == "write" and len(a) == 2:
                    _real(a[0], bytes(a[1])[: len(a[1]) // 2])  # a torn write
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*a, **kw)

        setattr(mod, name, wrapped)


def in_child(
    argv: list[str],
    kill_at: int = 0,
    count_file: Path | None = None,
    no_exchange: bool = False,
    kill_after: float | None = None,
    kill_on: str | None = None,
) -> int:
    """Run ``gptlab argv`` in a forked child; its exit status, or -9 when it was killed."""
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from gptlab.cli import main

            arm(kill_at, count_file, no_exchange, kill_on)
            os._exit(main(argv))
        except BaseException:
            os._exit(99)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def digest(folder: Path) -> str | None:
    """A hash of every file's name and content in ``folder`` (None if it is missing)."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden names in ``folder`` other than the run marker gptlab keeps in a run folder."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".gptlab-run")


def count_events(argv: list[str], work: Path, prepare_state) -> int:
    prepare_state()
    counter = work / "count.txt"
    counter.write_text("0")
    assert in_child(argv, count_file=counter) == 0, argv
    return int(counter.read_text())


def scenario_prepare(work: Path) -> dict:
    (work / "old.txt").write_text("the old corpus. " * 2000)
    (work / "new.txt").write_text("a new and different corpus! " * 3000)
    pristine, ref, out = work / "pristine", work / "ref", work / "data" / "ds"
    cmd = lambda src, dst: ["prepare", str(src), "--out-dir", str(dst), "--tokenizer", "char"]
    assert in_child(cmd(work / "old.txt", pristine)) == 0 and in_child(cmd(work / "new.txt", ref)) == 0
    old_d, new_d = digest(pristine), digest(ref)

    def reset():
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir()
        shutil.copytree(pristine, out)

    results = []
    for no_exchange in (False, True):
        n = count_events(cmd(work / "new.txt", out), work, reset)
        for k in range(1, n + 1):
            reset()
            rc = in_child(cmd(work / "new.txt", out), kill_at=k, no_exchange=no_exchange)
            after_kill = {old_d: "old", new_d: "new", None: "missing"}.get(digest(out), "other")
            rc2 = in_child(cmd(work / "new.txt", out))
            results.append(
                {
                    "k": k,
                    "of": n,
                    "no_exchange": no_exchange,
                    "rc": rc,
                    "after_kill": after_kill,
                    "recovery_rc": rc2,
                    "after_recovery": "new" if digest(out) == new_d else "other",
                    "leftovers": leftovers(out.parent),
                }
            )
    return {"cases": results}


def metrics_losses(run: Path) -> dict[int, float]:
    from gptlab.metrics import read_rows

    return {r["step"]: r["loss"] for r in read_rows(run / "metrics.jsonl") if "loss" in r}


def checkpoints_ok(run: Path) -> bool:
    """Every checkpoint the run lists verifies and loads (checked in a child: no torch work in this process)."""
    pid = os.fork()
    if pid == 0:
        try:
            from gptlab import checkpoint

            for checkpoint_dir in checkpoint.list_checkpoints(run):
                state = checkpoint.read_state(checkpoint_dir)
                checkpoint.load_weights(checkpoint_dir, state)
                checkpoint.load_training_state(checkpoint_dir, state)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


TINY_RUN = (  # --dtype float32: the kills count the run's own mutations (auto's first probe writes a cache file)
    "--model tiny --block-size 16 --batch-size 4 --max-iters 12 --checkpoint-interval 4 --eval-interval 4 "
    "--eval-iters 1 --final-eval-tokens 256 --keep-last 1 --threads 1 --device cpu --dtype float32 --json"
).split()


def train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    """A 12-step tiny run with three checkpoints: what the crash tests train."""
    return ["train", "--data", str(data), "--out-dir", str(run), *TINY_RUN, *extra]


def scenario_train(work: Path, n_kills: int = 20, n_random: int = 4) -> dict:
    (work / "c.txt").write_text(
        " ".join(
            random.Random(0).choice(["to", "be", "or", "not", "that", "is", "the", "question"]) for _ in range(20000)
        )
    )
    data = work / "data"
    assert in_child(["prepare", str(work / "c.txt"), "--out-dir", str(data), "--tokenizer", "char"]) == 0

    def cmd(run: Path, resume: bool) -> list[str]:
        return train_argv(data, run, "--log-interval", "2", "--warmup-iters", "2", *(["--resume"] if resume else []))

    ref = work / "ref"
    t0 = time.perf_counter()
    assert in_child(cmd(ref, False)) == 0
    seconds = time.perf_counter() - t0
    ref_losses = metrics_losses(ref)
    run = work / "run"

    def recovered(run: Path) -> dict:
        return {
            "losses_equal": metrics_losses(run) == ref_losses,
            "checkpoints_ok": checkpoints_ok(run),
            "leftovers": leftovers(run) + leftovers(run / "checkpoints"),
        }

    from gptlab.checkpoint import list_checkpoints

    n = count_events(cmd(run, False), work, lambda: shutil.rmtree(run, ignore_errors=True))
    ks = sorted({round(1 + i * (n - 1) / (n_kills - 1)) for i in range(n_kills)})
    rng = random.Random(1)
    plans = [("event", k) for k in ks] + [("time", rng.uniform(0.1, 0.9) * seconds) for _ in range(n_random)]
    results = []
    for how, at in plans:
        shutil.rmtree(run, ignore_errors=True)
        if how == "event":
            rc = in_child(cmd(run, False), kill_at=int(at))
        else:
            rc = in_child(cmd(run, False), kill_after=at)
        resumed = bool(list_checkpoints(run))
        rc2 = in_child(cmd(run, resumed))
        results.append(
            {"how": how, "at": at, "of": n, "rc": rc, "resumed": resumed, "recovery_rc": rc2, **recovered(run)}
        )

    def killed_and_recovered(how: str, at: object, resume: bool, **kill) -> dict:
        """Start afresh (or resume from the first checkpoint), kill as ``kill`` says, then run again."""
        shutil.rmtree(run, ignore_errors=True)
        if resume:
            in_child(cmd(run, False), kill_at=int(first_ckpt))
        ckpts = list_checkpoints(run)
        step = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
        rc = in_child(cmd(run, resume), **kill)
        kept = {s for s in metrics_losses(run) if s <= step} == {s for s in ref_losses if s <= step}
        resumed = bool(list_checkpoints(run))
        rc2 = in_child(cmd(run, resumed))
        return {"how": how, "at": at, "of": n, "rc": rc, "resumed": resumed, "recovery_rc": rc2,
                "history_kept": kept, **recovered(run)}  # fmt: skip

    # a kill early in a resumed run, where it rewrites metrics.jsonl and clears leftovers: the history survives
    first_ckpt = next(r["at"] for r in results if r["how"] == "event" and r["resumed"])
    results += [killed_and_recovered("resume-event", k, True, kill_at=k) for k in range(1, 9)]
    # named windows: the final rename of a checkpoint folder; in a resumed run's rewrite of metrics.jsonl, the fsync
    # of the new file and its rename
    windows = [
        ("checkpoint-rename", False, r"^replace \S+ \S+/checkpoints/step-0000008$"),
        ("metrics-fsync", True, r"^fsync \S*/\.metrics\.jsonl\.tmp-"),
        ("metrics-rename", True, r"^replace \S+ \S+/metrics\.jsonl$"),
    ]
    results += [killed_and_recovered("window", name, resume, kill_on=pattern) for name, resume, pattern in windows]
    return {"cases": results, "reference_steps": len(ref_losses)}


def scenario_outputs(work: Path) -> dict:
    """``quantize`` and ``convert`` (a Hugging Face folder, a GGUF file) killed at every one of their mutations, the
    final rename included: the output is absent or complete, never partial, and the next run of the same command
    succeeds with nothing left beside its output."""
    run = work / "model"  # a small GPT-2-shaped checkpoint the test made (GGUF's gpt2 layout needs GPT-2's BPE)
    out = work / "out"
    commands = {
        "quantize": (["quantize", str(run), "--mode", "int8", "--out-dir", str(out / "q")], out / "q"),
        "convert-hf": (["convert", str(run), "--to", "hf", "--out-dir", str(out / "hf")], out / "hf"),
        "convert-gguf": (["convert", str(run), str(out / "m.gguf")], out / "m.gguf"),
    }
    results = []
    for name, (argv, target) in commands.items():

        def state(target: Path = target) -> str | None:
            if target.is_file():
                return hashlib.sha256(target.read_bytes()).hexdigest()
            return digest(target)

        def reset() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()

        reset()
        assert in_child(argv) == 0  # once first: what a first run alone writes (the kernel cache) is not counted
        n = count_events(argv, work, reset)
        complete = state()
        for k in range(1, n + 1):
            reset()
            counter = work / "k.txt"
            rc = in_child(argv, kill_at=k, count_file=counter)
            after_kill = {complete: "complete", None: "absent"}.get(state(), "partial")
            left_by_kill = leftovers(out)
            rc2 = in_child(argv) if after_kill == "absent" else 0
            results.append(
                {
                    "command": name,
                    "k": k,
                    "of": n,
                    "rc": rc,
                    "after_kill": after_kill,
                    "left_by_kill": left_by_kill,
                    "recovery_rc": rc2,
                    "after_recovery": "complete" if state() == complete else "other",
                    "leftovers": leftovers(out),
                }
            )
    return {"cases": results}


if __name__ == "__main__":
    import torch._dynamo  # noqa: F401  (imported once here, not by each child's optimizer: ~1 s a child)

    import gptlab.cli
    import gptlab.data.prepare
    import gptlab.interop.cli
    import gptlab.quant.cli
    import gptlab.train.trainer  # noqa: F401

    scenario, work = sys.argv[1], Path(sys.argv[2])
    scenarios = {"prepare": scenario_prepare, "train": scenario_train, "outputs": scenario_outputs}
    print(json.dumps(scenarios[scenario](work)))
