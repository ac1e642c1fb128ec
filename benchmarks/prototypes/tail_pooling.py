"""Prototype (not in the library; reverted after measuring): token pooling on the last part of each prompt only
(positions past a fraction FRAC of its tokens), in both the transport and the preservation terms; the maps still
apply at every position. It patches the training forward's pooling, the unsteered targets and their per-prompt
counts in place, so nothing in lineas_fast changes. FRAC = 0 reproduces the defaults (3.14× at +9.58 %, the same
first loss and PPL).

    python benchmarks/prototypes/tail_pooling.py 0.5 0.5,0.75,1 OUT.jsonl [JSON lf.fit kwargs]

Needs the unsteered run's cache at /tmp/base.json (`benchmarks/tune_lineas.py --baseline-cache /tmp/base.json`)."""
import json, sys, time, torch, numpy as np
import lineas_fast as lf
import lineas_fast.forward, lineas_fast.collect, lineas_fast.methods.lineas
F, C, L = (sys.modules[m] for m in ("lineas_fast.forward", "lineas_fast.collect", "lineas_fast.methods.lineas"))
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages

FRAC = float(sys.argv[1]); STRENGTHS = [float(x) for x in sys.argv[2].split(",")]; OUT = sys.argv[3]
CFG = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
orig_pool = F.pool

def keep_of(m):
    c = m.cumsum(1); n = m.sum(1, keepdim=True)
    return m & (c > torch.floor(n * FRAC).long())

def tail_pool(h, mask, how):
    if how != "tokens":
        return orig_pool(h, mask, how)
    return h[keep_of(mask.bool())]

def kept(n):  # tokens kept of a prompt of n tokens
    return n - int(np.floor(n * FRAC))

L.pool = tail_pool  # the training forward's pooling
orig_collect = L.collect

def tail_collect(model, tok, texts, sites, *, pooling, max_length, **kw):
    """The unsteered targets: every token collected, then each prompt's block cut to its tail."""
    full = orig_collect(model, tok, texts, sites, pooling=pooling, max_length=max_length, **kw)
    if pooling != "tokens":
        return full
    lengths = [len(x) for x in tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]]
    out = {}
    for s, v in full.items():
        blocks = v.split(lengths)
        out[s] = torch.cat([b[len(b) - kept(len(b)):] for b in blocks])
    return out
L.collect = tail_collect

def _encoded(self, prompts):
    key = tuple(prompts)
    batches = self._batches.get(key)
    if batches is None:
        order = sorted(prompts, key=lambda i: (self.lengths[i], i))
        batches = []
        for k in range(0, len(order), self.micro_batch):
            chunk = order[k:k + self.micro_batch]
            ids, mask = L.encode(self.tok, [self.texts[i] for i in chunk], self.max_length, self.device)
            rows = torch.tensor(chunk, device=self.device)
            owner = rows.repeat_interleave(keep_of(mask.bool()).sum(1))
            batches.append((ids, mask, owner))
        if len(self._batches) < 4:
            self._batches[key] = batches
    return batches
L._EagerForward._encoded = _encoded

class TailTargets(L.Targets):
    @classmethod
    def from_counts(cls, v, counts):
        return super().from_counts(v, [kept(c) for c in counts])
L.Targets = TailTargets

if __name__ == "__main__":
    torch.set_num_threads(2); torch.manual_seed(0)
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
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
        row = {"config": {**CFG, "prototype": f"token pooling on each prompt's tokens past {FRAC:g} of its length"},
               "target": "nontoxic", "strength": lam, "steps_run": tr.get("steps_run"), "step_s": None, "fit_s": round(fit_s, 1),
               "nnz": st.nnz(), "active_sites": len(st.active_sites()), "first_loss": (tr.get("loss") or [None])[0],
               "final_loss": (tr.get("loss") or [None])[-1],
               **{k: round(r[k], 4) for k in ("toxic_rate", "mean_tox", "degenerate_rate", "ppl")},
               "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9), "ppl_change": r["ppl"] / base["ppl"] - 1,
               "toxic_diff_ci": [lo, hi], "examples": r["texts"][:3]}
        open(OUT, "a").write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
