"""One-off: the default detox map's halves apart (ω only, b only), on the eval slice."""
import json, sys
import torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages
from tune_lineas import _baseline, _metrics, _append

if __name__ == "__main__":
    torch.set_num_threads(2)
    path, out = sys.argv[1], sys.argv[2]
    jobs = [tuple(x.split(":")) for x in sys.argv[3].split(",")]  # half:strength
    model, tok = lf.load_model("smollm2-135m")
    prompts = lf.data.load_texts("toxic", "eval")[:300]
    passages = wiki_passages(tok, "eval")
    base = _baseline("/tmp/base.json", model, tok, prompts, passages)
    st = lf.Steering.load(path)
    halves = {"omega": lf.Steering(st.scale, {k: torch.zeros_like(v) for k, v in st.shift.items()}, st.meta),
              "shift": lf.Steering({k: torch.ones_like(v) for k, v in st.scale.items()}, st.shift, st.meta),
              "both": st}
    for half, lam in jobs:
        with lf.steered(model, halves[half], strength=float(lam)):
            r = E.evaluate_model(model, tok, prompts, passages)
        d, lo, hi = E.paired_bootstrap(base["toxic"], r["toxic"])
        row = {"config": {"map": path, "half": half}, "strength": float(lam), **_metrics(r),
               "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9), "ppl_change": r["ppl"] / base["ppl"] - 1,
               "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        _append(out, row)
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
