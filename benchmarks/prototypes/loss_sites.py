"""Prototype (not in the library; reverted after measuring): the maps act at every default site, but the transport
term counts only the sites of blocks FIRST..LAST (their columns' weights × 30 / their number of blocks, so the term
keeps its size against the preservation term, which still counts every site). It patches the trainer's
``wasserstein_loss_to`` in place, so nothing in lineas_fast changes.

    python benchmarks/prototypes/loss_sites.py FIRST LAST 0.5,0.75,1 OUT.jsonl

Needs the unsteered run's cache at /tmp/base.json (`benchmarks/tune_lineas.py --baseline-cache /tmp/base.json`)."""
import json, sys, time, torch, numpy as np
import lineas_fast as lf
import lineas_fast.methods.trainer
T = sys.modules["lineas_fast.methods.trainer"]
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages

FIRST, LAST = int(sys.argv[1]), int(sys.argv[2])
STRENGTHS = [float(x) for x in sys.argv[3].split(",")]; OUT = sys.argv[4]
orig = T.wasserstein_loss_to
MASK = {}


def masked(z, goal, weights):
    w = weights * MASK["m"].to(weights.device) if weights is not None else MASK["m"].to(z.device)
    return orig(z, goal, w)


if __name__ == "__main__":
    torch.set_num_threads(2); torch.manual_seed(0)
    model, tok = lf.load_model("smollm2-135m")
    from lineas_fast.sites import resolve_sites, site_widths
    sites = resolve_sites(model, "mlp_hidden"); widths = site_widths(model, sites)
    blocks = LAST - FIRST + 1
    MASK["m"] = torch.cat([torch.full((widths[s],), len(sites) / blocks if FIRST <= i <= LAST else 0.0)
                           for i, s in enumerate(sites)])
    T.wasserstein_loss_to = masked
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
    prompts = lf.data.load_texts("toxic", "eval")[:300]
    passages = wiki_passages(tok, "eval")
    base = json.load(open("/tmp/base.json"))
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, progress=False)
    fit_s = time.perf_counter() - t0
    tr = st.meta.get("train", {})
    for lam in STRENGTHS:
        with lf.steered(model, st, strength=lam):
            r = E.evaluate_model(model, tok, prompts, passages)
        d, lo, hi = E.paired_bootstrap(np.asarray(base["toxic"]), r["toxic"])
        row = {"config": {"prototype": f"transport term on blocks {FIRST}–{LAST} only (loss_sites.py)"},
               "target": "nontoxic", "strength": lam, "steps_run": tr.get("steps_run"), "step_s": None,
               "fit_s": round(fit_s, 1), "nnz": st.nnz(), "active_sites": len(st.active_sites()),
               "restarts": tr.get("restarts", []),
               "first_loss": (tr.get("loss") or [None])[0], "final_loss": (tr.get("loss") or [None])[-1],
               **{k: round(r[k], 4) for k in ("toxic_rate", "mean_tox", "degenerate_rate", "ppl")},
               "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9), "ppl_change": r["ppl"] / base["ppl"] - 1,
               "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        open(OUT, "a").write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
