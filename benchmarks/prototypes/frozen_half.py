"""One-off: LinEAS trained with one half of the affine map frozen (omega-only or shift-only), detox eval slice."""
import json, sys, time
import torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages
from tune_lineas import _baseline, _metrics, _append

if __name__ == "__main__":
    torch.set_num_threads(2)
    mode, out, extra, lams = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), [float(x) for x in sys.argv[4].split(",")]
    keep = {"omega": 0, "shift": 1}[mode]
    orig = torch.optim.Adam
    class Frozen(orig):  # the frozen half gets zero gradients: Adam's step for it is exactly 0
        def __init__(self, params, **kw):
            params = list(params)
            params[1 - keep].register_hook(lambda g: torch.zeros_like(g))
            super().__init__(params, **kw)
    torch.optim.Adam = Frozen
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
    prompts = lf.data.load_texts("toxic", "eval")[:300]
    passages = wiki_passages(tok, "eval")
    base = _baseline("/tmp/base.json", model, tok, prompts, passages)
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, progress=False, **extra)
    fit_s = time.perf_counter() - t0
    torch.optim.Adam = orig
    st.save(f"/tmp/proto/frozen_{mode}_{'_'.join(f'{k}={v}' for k, v in extra.items())}.safetensors")
    tr = st.meta["train"]
    print("loss", tr["loss"][0], tr["loss"][-1], flush=True)
    for lam in lams:
        with lf.steered(model, st, strength=lam):
            r = E.evaluate_model(model, tok, prompts, passages)
        d, lo, hi = E.paired_bootstrap(base["toxic"], r["toxic"])
        row = {"config": {"trained": mode + "_only", **extra}, "strength": lam, "fit_s": round(fit_s, 1),
               **_metrics(r), "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9),
               "ppl_change": r["ppl"] / base["ppl"] - 1, "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        _append(out, row)
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
