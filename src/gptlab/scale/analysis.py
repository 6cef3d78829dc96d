"""What a sweep's runs support: the fits (:func:`fit_rows`) and the losses they predict (:func:`predictions`),
shared by the sweep runner and its report."""

from __future__ import annotations

from typing import Any

from ..errors import GptlabError
from .fit import fit_chinchilla, fit_power_law, isoflop_profile


def largest_budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the largest budget, smallest model first (what L(N) and its held-out check are fitted on)."""
    top = max(r["budget"] for r in rows)
    return sorted((r for r in rows if r["budget"] == top), key=lambda r: r["params"])


def fit_rows(rows: list[dict[str, Any]], isoflop: bool = False) -> dict[str, Any]:
    """The fits the runs support:

    - token mode, at the largest token budget: L(N) = a·N^-α over non-embedding N (and with E from 4 runs), and
      the held-out prediction: fitted on all but the largest model, its predicted loss for the largest;
    - token mode with 3+ budgets: L(D) = b·D^-β for the largest model (and with E from 4 budgets);
    - IsoFLOP mode: the per-budget parabolas, N_opt ∝ C^a and D_opt ∝ C^b (from 2 budgets), and a held-out
      check: the minimum loss per budget as a power law in C, fitted without the largest budget, predicting it;
    - 5+ runs over 2+ sizes and 2+ token counts: the Chinchilla L(N, D) = E + A/N^α + B/D^β (total N), which
      ``gptlab plan scaling --law fits.json`` uses.
    """
    out: dict[str, Any] = {}
    if isoflop:
        try:
            out["isoflop"] = isoflop_profile(
                [r["budget"] for r in rows], [r["params"] for r in rows], [r["final_val_loss"] for r in rows]
            )
        except GptlabError as e:  # the runs and other fits are still worth writing; the report says why
            out["isoflop_error"] = str(e)
        b = out.get("isoflop", {}).get("budgets", [])
        if len(b) >= 3:
            held = fit_power_law([o["compute"] for o in b[:-1]], [o["loss_min"] for o in b[:-1]], bootstrap=0)
            pred = held.params["a"] * b[-1]["compute"] ** -held.params["alpha"]
            out["held_out"] = {
                "what": "minimum loss of the largest budget from L_min(C) fitted on the others",
                "fit_on": len(b) - 1,
                "params": held.params,
                "predicted_loss": pred,
                "actual_loss": b[-1]["loss_min"],
                "relative_error": (pred - b[-1]["loss_min"]) / b[-1]["loss_min"],
            }
    else:
        top = largest_budget(rows)
        n, loss = [r["non_embedding"] for r in top], [r["final_val_loss"] for r in top]
        out["power_law"] = fit_power_law(n, loss).to_dict()
        if len(top) >= 4:
            out["power_law_with_E"] = fit_power_law(n, loss, irreducible=True, bootstrap=50).to_dict()
        held_params = fit_power_law(n[:-1], loss[:-1], bootstrap=0).params
        pred = held_params["a"] * n[-1] ** -held_params["alpha"]
        out["held_out"] = {
            "what": "largest model's loss from L(N) fitted on the smaller ones",
            "fit_on": len(top) - 1,
            "params": held_params,
            "largest_non_embedding": n[-1],
            "predicted_loss": pred,
            "actual_loss": loss[-1],
            "relative_error": (pred - loss[-1]) / loss[-1],
        }
        if len(top) >= 5:  # the same check for the law with a floor, E + a·N^-α
            q = fit_power_law(n[:-1], loss[:-1], irreducible=True, bootstrap=0).params
            pred_e = q["E"] + q["a"] * n[-1] ** -q["alpha"]
            out["held_out"].update(
                params_with_E=q, predicted_loss_with_E=pred_e, relative_error_with_E=(pred_e - loss[-1]) / loss[-1]
            )
        if len({r["budget"] for r in rows}) >= 3:
            big = [r for r in rows if r["params"] == max(x["params"] for x in rows)]
            d, ld = [r["tokens"] for r in big], [r["final_val_loss"] for r in big]
            out["data_law"] = fit_power_law(d, ld).to_dict()
            if len(big) >= 4:
                out["data_law_with_E"] = fit_power_law(d, ld, irreducible=True, bootstrap=50).to_dict()
    if len(rows) >= 5 and len({r["params"] for r in rows}) >= 2 and len({r["tokens"] for r in rows}) >= 2:
        _, fit = fit_chinchilla(
            [r["params"] for r in rows], [r["tokens"] for r in rows], [r["final_val_loss"] for r in rows], bootstrap=30
        )
        out["chinchilla"] = fit.to_dict()
    return out


def predictions(
    rows: list[dict[str, Any]], fits: dict[str, Any]
) -> tuple[str, list[dict[str, Any]], list[float]] | None:
    """The runs a fit covers and their losses as it predicts them: Chinchilla L(N, D) when fitted, else L(N)
    (with E when fitted) over the largest token budget."""
    if "chinchilla" in fits:
        p = fits["chinchilla"]["params"]
        return (
            "L = E + A/N^α + B/D^β",
            rows,
            [p["E"] + p["A"] / r["params"] ** p["alpha"] + p["B"] / r["tokens"] ** p["beta"] for r in rows],
        )
    key = "power_law_with_E" if "power_law_with_E" in fits else "power_law"
    if key not in fits:
        return None
    p = fits[key]["params"]
    top = largest_budget(rows)
    return (
        ("L = E + a·N^-α" if "E" in p else "L = a·N^-α"),
        top,
        [p.get("E", 0.0) + p["a"] * r["non_embedding"] ** -p["alpha"] for r in top],
    )
