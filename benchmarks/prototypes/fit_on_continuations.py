"""One-off: fit LinEAS on prompt + the unsteered model's greedy continuation (the positions the eval scores)."""
import json, sys, time
import numpy as np, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages
from tune_lineas import _baseline, _metrics, _append

if __name__ == "__main__":
    torch.set_num_threads(2)
    which, out, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
    prompts = lf.data.load_texts("toxic", "eval")[:300]
    passages = wiki_passages(tok, "eval")
    base = _baseline("/tmp/base.json", model, tok, prompts, passages)
    def extend(texts):
        conts = E.continuations(model, tok, texts)[0]
        return [t + c for t, c in zip(texts, conts)]
    if which in ("src", "both"):
        src = extend(src)
    if which in ("tgt", "both"):
        tgt = extend(tgt)
    print(src[:2], tgt[:2], flush=True)
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, progress=False, **extra)
    fit_s = time.perf_counter() - t0
    for lam in (0.5, 0.75, 1.0):
        with lf.steered(model, st, strength=lam):
            r = E.evaluate_model(model, tok, prompts, passages)
        d, lo, hi = E.paired_bootstrap(base["toxic"], r["toxic"])
        row = {"config": {"fit_on_continuations": which, **extra}, "strength": lam, "fit_s": round(fit_s, 1),
               **_metrics(r), "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9),
               "ppl_change": r["ppl"] / base["ppl"] - 1, "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        _append(out, row)
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
