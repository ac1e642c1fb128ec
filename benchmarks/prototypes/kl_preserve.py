"""Prototype (not in the library; reverted after measuring): the preservation term measured at the model's
*output* instead of at every site. Each step the target prompts of the mini-batch also run the whole model with
the current maps, and the term is the mean per-token KL(unsteered next-token distribution ‖ steered one),
times SCALE — what perplexity on text like the target measures, instead of how far each hidden neuron moved.
MODE "kl" replaces the paired term by it; "both" adds it to the paired term. It patches the training forward
and the trainer's ``paired_loss`` in place, so nothing in lineas_fast changes.

    python benchmarks/prototypes/kl_preserve.py MODE SCALE 0.5,0.75,1 OUT.jsonl [JSON lf.fit kwargs]
    python benchmarks/prototypes/kl_preserve.py calibrate    # the two terms at the default fit's map

Needs the unsteered run's cache at /tmp/base.json (`benchmarks/tune_lineas.py --baseline-cache /tmp/base.json`)."""
import json, sys, time, torch, numpy as np
import lineas_fast as lf
import lineas_fast.forward, lineas_fast.methods.lineas, lineas_fast.methods.trainer
F, L, T = (sys.modules[m] for m in ("lineas_fast.forward", "lineas_fast.methods.lineas", "lineas_fast.methods.trainer"))
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages

STATE = {}
orig_bind, orig_call, orig_paired = L._EagerForward.bind, L._EagerForward.__call__, T.paired_loss


def bind(self, omega, shift):
    STATE["fw"] = self
    orig_bind(self, omega, shift)


def call(self, prompts):
    STATE["prompts"] = list(prompts)
    return orig_call(self, prompts)


def output_kl(fw, prompts, omega=None, shift=None):
    """Mean per-token KL(unsteered ‖ steered) over the prompts' non-pad positions, the maps (ω, b) applied at
    every site (default: the forward's bound ones) in a full forward; the forward's own tap is lifted meanwhile."""
    omega = fw.omega if omega is None else omega
    shift = fw.shift if shift is None else shift
    ids, mask = F.encode(fw.tok, [fw.texts[i] for i in prompts], fw.max_length, fw.device)
    inputs = F.model_inputs(ids, mask)
    fw._tap.__exit__(None, None, None)
    try:
        with torch.no_grad():
            ref = torch.log_softmax(fw.model(**inputs).logits.float(), -1)

        def steer(spec, h):
            sl = fw.slices[spec]
            return (h.float() * omega[sl] + shift[sl]).to(h.dtype)

        with F.tap(fw.model, fw.sites, steer, stop_early=False):
            out = torch.log_softmax(fw.model(**inputs).logits.float(), -1)
    finally:
        fw.__enter__()
    keep = mask.bool()
    kl = (ref.exp() * (ref - out)).sum(-1)
    return kl[keep].mean()


def make_loss(mode, scale, n_source):
    def loss(z, ref, weights):
        fw = STATE["fw"]
        tgt = [i for i in STATE["prompts"] if i >= n_source]
        kl = scale * output_kl(fw, tgt)
        return kl if mode == "kl" else orig_paired(z, ref, weights) + kl
    return loss


if __name__ == "__main__":
    torch.set_num_threads(2); torch.manual_seed(0)
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
    if sys.argv[1] == "calibrate":  # paired term and output KL of the default fit's map, all 32 target prompts
        st = lf.fit(model, tok, src, tgt, progress=False)
        sites = list(st.scale)
        sl, _ = T.site_slices(sites, {s: st.scale[s].shape[-1] for s in sites})
        omega = torch.cat([st.scale[s].reshape(-1) for s in sites]); shift = torch.cat([st.shift[s].reshape(-1) for s in sites])
        fw = L._EagerForward(model, tok, src + tgt, sites, sl, [], pooling="tokens", max_length=64, micro_batch=64)
        with fw:
            fw.bind(omega, shift)
            z, owner = fw(list(range(32, 64)))
        v = torch.cat([lf.collect(model, tok, tgt, sites, pooling="tokens", max_length=64)[s] for s in sites], 1)
        counts = [len(t) for t in tok(tgt, truncation=True, max_length=64)["input_ids"]]
        rows = T.Targets.from_counts(v, counts).rows_of
        ref = v[torch.cat([rows[j - 32] for j in torch.unique_consecutive(owner).tolist()])]
        paired = float(orig_paired(z.detach().float(), ref, T.column_weights(v, "var")))
        tr = st.meta.get("train", {})
        print(json.dumps({"final_transport": tr.get("transport", [None])[-1], "final_preserve": tr.get("preserve", [None])[-1]}))
        with fw:
            kl = float(output_kl(fw, list(range(32, 64)), omega, shift))
        print(json.dumps({"paired": paired, "kl_per_token": kl, "scale_for_equal_terms": paired / kl}))
        sys.exit(0)
    MODE, SCALE = sys.argv[1], float(sys.argv[2])
    STRENGTHS = [float(x) for x in sys.argv[3].split(",")]; OUT = sys.argv[4]
    CFG = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    L._EagerForward.bind, L._EagerForward.__call__ = bind, call
    T.paired_loss = make_loss(MODE, SCALE, len(src))
    prompts = lf.data.load_texts("toxic", "eval")[:300]
    passages = wiki_passages(tok, "eval")
    base = json.load(open("/tmp/base.json"))
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, progress=False, **CFG)
    fit_s = time.perf_counter() - t0
    tr = st.meta.get("train", {})
    for lam in STRENGTHS:
        with lf.steered(model, st, strength=lam):
            r = E.evaluate_model(model, tok, prompts, passages)
        d, lo, hi = E.paired_bootstrap(np.asarray(base["toxic"]), r["toxic"])
        row = {"config": {**CFG, "prototype": f"output-KL preservation ({MODE}, scale {SCALE:g})"},
               "target": "nontoxic", "strength": lam, "steps_run": tr.get("steps_run"), "step_s": None,
               "fit_s": round(fit_s, 1), "nnz": st.nnz(), "active_sites": len(st.active_sites()),
               "first_loss": (tr.get("loss") or [None])[0], "final_loss": (tr.get("loss") or [None])[-1],
               **{k: round(r[k], 4) for k in ("toxic_rate", "mean_tox", "degenerate_rate", "ppl")},
               "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9), "ppl_change": r["ppl"] / base["ppl"] - 1,
               "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        open(OUT, "a").write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
