"""Scaling laws with the published constants, and compute-optimal allocation of a FLOP budget.

Losses are in nats per token on each paper's own data and tokenizer (Kaplan: WebText2, non-embedding N; Hoffmann:
MassiveText, total N), so they compare allocations, not datasets. C = 6·N·D throughout, as both papers use.

- Kaplan et al. 2020, "Scaling Laws for Neural Language Models". Two different constant sets must not be mixed:
  the single-variable fits of section 1.2 / Figure 1 (N_c = 8.8e13, alpha_N = 0.076; D_c = 5.4e13,
  alpha_D = 0.095; C_c^min = 3.1e8 PF-days, alpha_C^min = 0.050) and the joint L(N, D) fit of Table 2 / eq. 4.1
  (N_c = 6.4e13, alpha_N = 0.076, D_c = 1.8e13, alpha_D = 0.103). Compute-efficient size: N ≈ 1.3e9 · C_min^0.73
  with C_min in PF-days (Figure 14).
- Hoffmann et al. 2022 ("Chinchilla"), Approach 3 (eq. 10): L(N, D) = E + A/N^alpha + B/D^beta with E = 1.69,
  A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28; minimising it under C = 6ND gives eq. 4,
  N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b, G = (alpha·A / (beta·B))^(1/(alpha+beta)), a = beta/(alpha+beta).
  Approaches 1 and 2 publish only exponents (Table 2: a = 0.50 and 0.49); gptlab anchors them at the paper's
  Table 3 row for Gopher's budget (5.76e23 FLOPs → 67B parameters), which the tests check against the table's
  other rows.
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt": Approach 3 refit on the paper's own data,
  E = 1.8172, A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658; unlike the original constants it agrees with
  Approaches 1 and 2 (about 20 tokens per parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptlabError
from .hardware import PF_DAY

# Kaplan et al. 2020, single-variable fits (Figure 1 / section 1.2).
KAPLAN_N = (8.8e13, 0.076)
KAPLAN_D = (5.4e13, 0.095)
KAPLAN_C_MIN = (3.1e8, 0.050)  # PF-days
# Kaplan et al. 2020, joint fit (Table 2, eq. 4.1): its own N_c and D_c.
KAPLAN_ND = {"N_c": 6.4e13, "alpha_N": 0.076, "D_c": 1.8e13, "alpha_D": 0.103}
KAPLAN_N_OPT = (1.3e9, 0.73)  # N_opt = 1.3e9 · (C_min / PF-day)^0.73, Figure 14
CHINCHILLA_ANCHOR = (5.76e23, 67e9)  # Hoffmann et al. 2022, Table 3, Gopher's budget
APPROACH_EXPONENTS = {"approach1": 0.50, "approach2": 0.49}  # Table 2, a in N_opt ∝ C^a
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under 6·N·D = compute (Hoffmann et al. 2022, eq. 4 and Appendix D.2)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (compute / 6) ** self.a, (compute / 6) ** (1 - self.a) / g


HOFFMANN = ChinchillaLaw(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, Approach 3")
BESIROGLU = ChinchillaLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 refit")
LAWS = {"hoffmann": HOFFMANN, "besiroglu": BESIROGLU}


def load_law(spec: str) -> ChinchillaLaw:
    """A published law by name (``hoffmann``, ``besiroglu``), or constants fitted on the user's own data: the
    ``fits.json`` that ``gptlab scale`` writes (its ``chinchilla`` fit), or a JSON object with E, A, B, alpha, beta."""
    if spec in LAWS:
        return LAWS[spec]
    path = Path(spec)
    if not path.is_file():
        raise GptlabError(
            f"--law {spec!r} is neither {' nor '.join(LAWS)} nor a JSON file; give a name or the "
            f"fits.json of a `gptlab scale` sweep"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"--law {path}: not valid JSON ({e})") from None
    consts = data.get("chinchilla", {}).get("params", data) if isinstance(data, dict) else {}
    keys = ("E", "A", "B", "alpha", "beta")
    if not all(isinstance(consts.get(k), (int, float)) for k in keys):
        raise GptlabError(
            f"--law {path} holds no L(N, D) constants (E, A, B, alpha, beta); a sweep fits them when "
            f"its runs vary both N and D: `gptlab scale --flops ...` or several --tokens budgets"
        )
    return ChinchillaLaw(**{k: float(consts[k]) for k in keys}, source=f"fitted ({path})")


def kaplan_loss_n(n: float) -> float:
    """L(N) = (N_c / N)^alpha_N: converged loss of a model with N non-embedding parameters."""
    return (KAPLAN_N[0] / n) ** KAPLAN_N[1]


def kaplan_loss_d(d: float) -> float:
    """L(D) = (D_c / D)^alpha_D: a large model trained with early stopping on D tokens."""
    return (KAPLAN_D[0] / d) ** KAPLAN_D[1]


def kaplan_loss_c(compute_flops: float) -> float:
    """L(C_min) = (C_c^min / C_min)^alpha_C^min, compute in FLOPs (converted to PF-days)."""
    return (KAPLAN_C_MIN[0] / (compute_flops / PF_DAY)) ** KAPLAN_C_MIN[1]


def kaplan_loss_nd(n: float, d: float) -> float:
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D with the joint fit's own constants."""
    k = KAPLAN_ND
    return ((k["N_c"] / n) ** (k["alpha_N"] / k["alpha_D"]) + k["D_c"] / d) ** k["alpha_D"]


def size_for_loss_ratio(ratio: float, alpha: float = KAPLAN_N[1]) -> float:
    """How many times more parameters multiply L(N) = (N_c/N)^alpha by ``ratio`` (< 1): ratio^(-1/alpha).
    Halving the loss takes 2^(1/0.076) ≈ 9,100× the parameters."""
    return ratio ** (-1 / alpha)


def allocate(compute: float, method: str) -> tuple[float, float]:
    """(N, D) for a budget of ``compute`` FLOPs by ``method``: ``hoffmann`` / ``besiroglu`` (Approach 3 closed
    form), ``approach1`` / ``approach2`` (power laws through the Table 3 anchor), ``tokens20`` (D = 20·N, so
    N = sqrt(C / 120)) or ``kaplan`` (N = 1.3e9 · C_min^0.73, C in PF-days). D = C / (6·N) where not given."""
    if compute <= 0:
        raise GptlabError(f"the compute budget must be positive, got {compute:g} FLOPs")
    if method in LAWS:
        return LAWS[method].optimal(compute)
    if method in APPROACH_EXPONENTS:
        c0, n0 = CHINCHILLA_ANCHOR
        n = n0 * (compute / c0) ** APPROACH_EXPONENTS[method]
    elif method == "tokens20":
        n = (compute / (6 * TOKENS_PER_PARAM)) ** 0.5
    elif method == "kaplan":
        n = KAPLAN_N_OPT[0] * (compute / PF_DAY) ** KAPLAN_N_OPT[1]
    else:
        raise GptlabError(
            f"unknown allocation {method!r}; choose one of: "
            f"{', '.join([*LAWS, *APPROACH_EXPONENTS, 'tokens20', 'kaplan'])}"
        )
    return n, compute / (6 * n)


METHODS = ("hoffmann", "besiroglu", "approach1", "approach2", "tokens20", "kaplan")


def compare_allocations(
    compute: float, extra: dict[str, tuple[float, float]] | None = None, law: ChinchillaLaw = HOFFMANN
) -> list[dict[str, float | str]]:
    """Every allocation of ``compute`` (plus ``extra`` named (N, D) pairs, e.g. GPT-3's 175B / 300B) with the loss
    that ``law`` and Kaplan's joint L(N, D) predict for it; a fitted ``law`` (not a published one) adds its own
    optimum as the first row, ``fitted``."""
    rows = [(m, *allocate(compute, m)) for m in METHODS] + [(k, n, d) for k, (n, d) in (extra or {}).items()]
    if law not in LAWS.values():  # constants fitted on the user's data: their own compute-optimal split first
        rows.insert(0, ("fitted", *law.optimal(compute)))
    return [
        {
            "allocation": m,
            "params": n,
            "tokens": d,
            "tokens_per_param": d / n,
            "compute": 6 * n * d,
            "loss_chinchilla": law.loss(n, d),
            "loss_kaplan_nd": kaplan_loss_nd(n, d),
        }
        for m, n, d in rows
    ]
