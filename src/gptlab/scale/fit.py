"""Scaling-law fits with uncertainty: power laws in one variable, the Chinchilla parametric law, IsoFLOP profiles.

- :func:`fit_power_law`: L(x) = a·x^(−α) (least squares on log L against log x), or with an irreducible term,
  L(x) = E + a·x^(−α) (least squares on log L, L-BFGS from several starting points).
- :func:`fit_chinchilla`: L(N, D) = E + A/N^α + B/D^β as Hoffmann et al. 2022 fit it (Appendix D.2): minimise the
  Huber loss (δ = 1e-3) between log L̂ and log L, with L̂ written as LSE(a − α·log N, b − β·log D, e) (A = e^a,
  B = e^b, E = e^e), by L-BFGS from a grid of initialisations (the 12 with the lowest starting loss), keeping the
  best.
- :func:`isoflop_profile`: per compute budget, a parabola in log N through the runs around that budget's lowest loss;
  its vertex is the budget's optimal N (budgets whose minimum is not bracketed are skipped, not extrapolated);
  then N_opt ∝ C^a and D_opt ∝ C^b fitted across budgets (Approach 2).
- Intervals: for L = a·x^(−α), the least-squares t-interval on log L (Student's t with n − 2 degrees of freedom:
  exact under normal errors in log L, and estimable from 3 runs, where it is wide); for the fits with more
  parameters, the percentile bootstrap over the runs (``bootstrap`` resamples, seeded). An interval that the data
  cannot give (too few runs, or no spread) is left out, with ``note`` saying why, never reported as zero-width.

All fits use torch in float64 (no extra dependency); the tests recover known constants from synthetic data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GptlabError
from ..plan.scaling import ChinchillaLaw


@dataclass
class Fit:
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    residual: float  # RMS error of log L
    method: str = "bootstrap"  # how the intervals were computed
    note: str | None = None  # why there are no intervals, when there are none

    def to_dict(self) -> dict:
        out = {
            "params": self.params,
            "ci95": {k: list(v) for k, v in self.intervals.items()},
            "ci95_method": self.method,
            "rms_log_residual": self.residual,
        }
        return out if self.note is None else {**out, "ci95_note": self.note}


def student_t_quantile(p: float, dof: int) -> float:
    """The ``p``-quantile of Student's t distribution with ``dof`` degrees of freedom: bisection on its CDF, the
    density integrated by Simpson's rule (the tests compare it with ``scipy.stats.t.ppf``)."""
    if not 0 < p < 1 or dof < 1:
        raise GptlabError(f"a t quantile needs 0 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(t: float) -> float:
        u = np.linspace(0.0, abs(t), 4001)
        f = np.exp(c - (dof + 1) / 2 * np.log1p(u * u / dof))
        area = (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        return 0.5 + math.copysign(area, t)

    lo, hi = -1.0, 1.0
    while cdf(lo) > p:
        lo *= 2
    while cdf(hi) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _ols_intervals(lx: np.ndarray, ly: np.ndarray) -> tuple[dict[str, tuple[float, float]], str | None]:
    """95 % t-intervals of a and α for log L = log a − α·log x by least squares, or (none, why)."""
    n = len(lx)
    if len(np.unique(lx)) < 3:
        return {}, f"an interval needs at least 3 distinct sizes; this fit has {len(np.unique(lx))}"
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (intercept + slope * lx)
    s2 = float((resid**2).sum()) / (n - 2)
    if math.sqrt(s2) <= 1e-12 * (1 + float(np.abs(ly).max())):  # round-off, not spread
        return {}, "the points lie exactly on the fitted line: there is no spread to estimate an interval from"
    sxx = float(((lx - lx.mean()) ** 2).sum())
    t = student_t_quantile(0.975, n - 2)
    se_slope, se_int = math.sqrt(s2 / sxx), math.sqrt(s2 * (1 / n + lx.mean() ** 2 / sxx))
    alpha = (float(-slope - t * se_slope), float(-slope + t * se_slope))
    a = (math.exp(intercept - t * se_int), math.exp(intercept + t * se_int))
    return {"a": a, "alpha": alpha}, None


def _check(xs: Sequence[float], ys: Sequence[float], need: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < need:
        raise GptlabError(f"a fit needs at least {need} (x, loss) points of equal count, got {len(x)} and {len(y)}")
    if (x <= 0).any() or (y <= 0).any():
        raise GptlabError("scaling-law fits need positive sizes and losses")
    return x, y


def _bootstrap(
    fit_once: Callable[[np.ndarray], dict[str, float]], n: int, samples: int, seed: int, params: int
) -> tuple[dict[str, tuple[float, float]], str | None]:
    """Percentile intervals over resamples of the ``n`` runs that keep more distinct runs than the fit has
    ``params``, or (none, why) when the runs are too few for resamples to vary."""
    if n < params + 2:
        return {}, f"a bootstrap interval for {params} parameters needs at least {params + 2} runs; this fit has {n}"
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        if len(set(idx.tolist())) <= params:
            continue
        for k, v in fit_once(idx).items():
            draws.setdefault(k, []).append(v)
    out = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}
    if not out or all(lo == hi for lo, hi in out.values()):
        return {}, "the resamples did not vary the fit; no interval can be estimated from these runs"
    return out, None


def _lbfgs(loss_fn: Callable[[torch.Tensor], torch.Tensor], starts: list[list[float]], keep: int = 12) -> np.ndarray:
    """The best L-BFGS optimum from the ``keep`` starting points with the lowest initial loss."""
    with torch.no_grad():
        first = [loss_fn(torch.tensor(s, dtype=torch.float64)).item() for s in starts]
    order = sorted(range(len(starts)), key=lambda i: first[i] if math.isfinite(first[i]) else math.inf)
    best, best_loss = None, math.inf
    for start in [starts[i] for i in order[:keep]]:
        p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [p], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = loss_fn(p)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            value = loss_fn(p).item()
        if math.isfinite(value) and value < best_loss:
            best, best_loss = p.detach().numpy().copy(), value
    if best is None:
        raise GptlabError("the fit did not converge from any starting point; check the data")
    return best


def fit_power_law(
    size: Sequence[float], loss: Sequence[float], irreducible: bool = False, bootstrap: int = 200, seed: int = 0
) -> Fit:
    """L = a·x^(−α) (``irreducible=False``) or L = E + a·x^(−α), with 95 % bootstrap intervals."""
    x, y = _check(size, loss, 4 if irreducible else 2)
    lx, ly = np.log(x), np.log(y)

    lo = float(np.log(y.min()))
    grid = [[la, al, lo + dl] for la, al, dl in itertools.product((0.0, 2.0, 5.0), (0.1, 0.3, 0.7), (-3.0, -1.0, -0.2))]

    def once(idx: np.ndarray, starts: list[list[float]] | None = None) -> dict[str, float]:
        if not irreducible:
            slope, intercept = np.polyfit(lx[idx], ly[idx], 1)
            return {"a": float(math.exp(intercept)), "alpha": float(-slope)}
        X, Y = torch.tensor(lx[idx]), torch.tensor(ly[idx])

        def objective(p: torch.Tensor) -> torch.Tensor:  # p = (log a, alpha, log E)
            pred = torch.logaddexp(p[0] - p[1] * X, p[2])
            return ((pred - Y) ** 2).mean()

        p = _lbfgs(objective, starts or grid)
        return {"a": float(math.exp(p[0])), "alpha": float(p[1]), "E": float(math.exp(p[2]))}

    params = once(np.arange(len(x)))
    pred = np.log((params.get("E", 0.0)) + params["a"] * x ** -params["alpha"])
    residual = float(np.sqrt(np.mean((pred - ly) ** 2)))
    if not irreducible:
        intervals, note = _ols_intervals(lx, ly)
        return Fit(params, intervals, residual, f"t-interval, {len(x) - 2} degrees of freedom", note)
    if not bootstrap:
        return Fit(params, {}, residual, "none", "bootstrap=0: no intervals asked for")
    # resamples start from the full fit (Hoffmann et al. refit their bootstrap the same way)
    full = [[math.log(params["a"]), params["alpha"], math.log(params["E"])]]
    intervals, note = _bootstrap(lambda idx: once(idx, full), len(x), bootstrap, seed, 3)
    return Fit(params, intervals, residual, f"bootstrap, {bootstrap} resamples", note)


def fit_chinchilla(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    bootstrap: int = 100,
    seed: int = 0,
    delta: float = 1e-3,
) -> tuple[ChinchillaLaw, Fit]:
    """Hoffmann et al. 2022's Approach 3 fit (see the module docstring), with bootstrap intervals."""
    n_arr, y = _check(n, loss, 5)
    d_arr, _ = _check(d, loss, 5)
    ln, ld, ly = np.log(n_arr), np.log(d_arr), np.log(y)
    grid = [
        [a, b, e, al, be]
        for a, b, e, al, be in itertools.product(
            (0.0, 10.0, 20.0), (0.0, 10.0, 20.0), (-1.0, 0.5), (0.0, 0.5, 1.0), (0.0, 0.5, 1.0)
        )
    ]

    def once(idx: np.ndarray, starts: list[list[float]] = grid) -> dict[str, float]:
        N, D, Y = torch.tensor(ln[idx]), torch.tensor(ld[idx]), torch.tensor(ly[idx])

        def objective(p: torch.Tensor) -> torch.Tensor:  # p = (a, b, e, alpha, beta)
            pred = torch.logsumexp(torch.stack([p[0] - p[3] * N, p[1] - p[4] * D, p[2].expand_as(N)]), 0)
            return torch.nn.functional.huber_loss(pred, Y, delta=delta, reduction="sum")

        p = _lbfgs(objective, starts)
        return {
            "E": float(math.exp(p[2])),
            "A": float(math.exp(p[0])),
            "B": float(math.exp(p[1])),
            "alpha": float(p[3]),
            "beta": float(p[4]),
        }

    params = once(np.arange(len(y)))
    law = ChinchillaLaw(params["E"], params["A"], params["B"], params["alpha"], params["beta"], "fitted here")
    pred = np.log([law.loss(a, b) for a, b in zip(n_arr, d_arr)])
    full = [[math.log(params["A"]), math.log(params["B"]), math.log(params["E"]), params["alpha"], params["beta"]]]
    residual = float(np.sqrt(np.mean((pred - ly) ** 2)))
    if not bootstrap:
        return law, Fit(params, {}, residual, "none", "bootstrap=0: no intervals asked for")
    intervals, note = _bootstrap(lambda idx: once(idx, full), len(y), bootstrap, seed, 5)
    return law, Fit(params, intervals, residual, f"bootstrap, {bootstrap} resamples", note)


def _vertex(c: float, n: np.ndarray, loss: np.ndarray) -> dict:
    """One budget's optimum: the vertex of a parabola in log N through the lowest-loss run and up to two distinct
    sizes on each side, or ``{"compute", "reason"}`` when the runs do not bracket it."""
    sizes = np.unique(n)
    mean = np.array([loss[n == x].mean() for x in sizes])  # a bootstrap resample can repeat a run
    i = int(np.argmin(mean))
    if i in (0, len(sizes) - 1):
        where = "smallest" if i == 0 else "largest"
        return {
            "compute": c,
            "reason": f"the lowest loss is at the {where} size, so the optimum lies beyond the "
            f"sizes run; add {where[:-3]}er models",
        }
    lo, hi = max(0, i - 2), min(len(sizes), i + 3)
    q2, q1, q0 = np.polyfit(np.log(sizes[lo:hi]), mean[lo:hi], 2)
    if q2 <= 0:
        return {"compute": c, "reason": "the losses around the minimum do not curve upward"}
    n_opt = math.exp(-q1 / (2 * q2))
    return {
        "compute": c,
        "n_opt": n_opt,
        "loss_min": float(q0 - q1 * q1 / (4 * q2)),
        "d_opt": c / (6 * n_opt),
        "parabola": [float(q2), float(q1), float(q0)],
        "n_range": [float(sizes[lo]), float(sizes[hi - 1])],
    }


def _exponents(optima: list[dict]) -> dict[str, float]:
    lc = np.log([o["compute"] for o in optima])
    a, log_kn = np.polyfit(lc, np.log([o["n_opt"] for o in optima]), 1)
    b, log_kd = np.polyfit(lc, np.log([o["d_opt"] for o in optima]), 1)
    return {"a": float(a), "b": float(b), "k_n": float(math.exp(log_kn)), "k_d": float(math.exp(log_kd))}


def isoflop_profile(
    compute: Sequence[float], n: Sequence[float], loss: Sequence[float], bootstrap: int = 200, seed: int = 0
) -> dict:
    """Per budget (runs grouped by equal ``compute``, >= 3 sizes each), the vertex of a parabola in log N fitted to
    the lowest-loss run and up to two neighbours on each side. A budget whose lowest loss is at its smallest or
    largest size has its optimum outside the sizes run; it is listed under ``skipped`` with the reason, not
    extrapolated. Then N_opt = k_N·C^a and D_opt = k_D·C^b across the kept budgets (>= 2), D = C / 6N.
    Intervals (``ci95``): each budget's runs resampled with replacement, the profile refitted, percentiles of
    N_opt per budget and of a and b over the resamples that kept the same budgets."""
    c_arr, n_arr, y = (np.asarray(v, dtype=np.float64) for v in (compute, n, loss))
    budgets = sorted(set(c_arr.tolist()))
    for c in budgets:
        if len(np.unique(n_arr[c_arr == c])) < 3:
            raise GptlabError(
                f"the budget {c:.3g} FLOPs has {int((c_arr == c).sum())} run(s) of "
                f"{len(np.unique(n_arr[c_arr == c]))} size(s); an IsoFLOP parabola needs >= 3 model "
                f"sizes per budget"
            )
    fits = [_vertex(c, n_arr[c_arr == c], y[c_arr == c]) for c in budgets]
    optima = [f for f in fits if "n_opt" in f]
    if not optima:
        raise GptlabError(
            "no budget brackets its optimum: " + "; ".join(f"{f['compute']:.3g} FLOPs: {f['reason']}" for f in fits)
        )
    out: dict = {"budgets": optima, "skipped": [f for f in fits if "reason" in f]}
    if len(optima) >= 2:
        out.update(_exponents(optima))
    kept = [o["compute"] for o in optima]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(bootstrap):
        again = []
        for c in kept:
            idx = np.flatnonzero(c_arr == c)
            idx = rng.choice(idx, len(idx))
            again.append(_vertex(c, n_arr[idx], y[idx]) if len(np.unique(n_arr[idx])) >= 3 else {})
        if not all("n_opt" in o for o in again):
            continue
        for o in again:
            draws.setdefault(f"n_opt@{o['compute']:.3g}", []).append(o["n_opt"])
        if len(again) >= 2:
            for k, v in _exponents(again).items():
                if k in ("a", "b"):
                    draws.setdefault(k, []).append(v)
    if draws:
        out["ci95"] = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}
        out["bootstrap_kept"] = len(next(iter(draws.values())))  # of ``bootstrap`` resamples
    return out
