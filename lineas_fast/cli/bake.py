"""``lineas-fast bake``: its options, :func:`validate` (the torch-free argument checks
:func:`lineas_fast.cli.main` runs first) and :func:`run`, which folds a steering into the weights with
:func:`lineas_fast.bake`, saves a plain transformers checkpoint and checks that stock transformers reloads
it with the steered logits."""

from __future__ import annotations

from pathlib import Path

from .common import finite, load_model, load_steering, model_for, no_hf_bars, output_dir, say


def add_parser(sub, common, fmt) -> None:
    b = sub.add_parser(
        "bake", parents=[common], formatter_class=fmt,
        help="fold a steering into the weights and save a plain HF checkpoint",
                       description="lf.bake() the steering into the model at a fixed strength, then "
                                   "save_pretrained() model and tokenizer: stock transformers reloads the folder "
                                   "with the steered outputs. Refuses (naming the sites) where a checkpoint "
                                   "cannot express the steering.")
    b.add_argument("--steering", required=True, metavar="FILE", help="steering file (.safetensors)")
    b.add_argument("--strength", type=float, required=True, help="steering strength λ to bake in")
    b.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    b.add_argument("--model", default=None,
                   help="embedded model name or local folder (default: the model recorded in the steering file)")
    b.add_argument("--no-verify", action="store_true",
                   help="skip reloading the checkpoint with stock transformers to compare logits")
    b.set_defaults(func=run, validate=validate)


def validate(args) -> None:
    """Refuse a non-finite strength and an ``--out`` that is a file or cannot be written, before torch is
    imported or the model loaded (not after the bake)."""
    finite("--strength", args.strength)
    output_dir("--out", args.out)


def run(args) -> int:
    import torch

    import lineas_fast as lf

    st = load_steering(args.steering)
    out = Path(args.out)
    model, tok = load_model(model_for(st, args.model))
    probe = tok(["The weather today is", "You are such a"], return_tensors="pt", padding=True)
    with torch.no_grad(), lf.steered(model, st, strength=args.strength, mode="hooks"):
        want = model(**probe).logits
    flags_before = {k: v for k, v in model.config.to_dict().items() if k.endswith("_bias")}
    lf.bake(model, st, strength=args.strength)  # validates everything before touching the model
    flags = {k: v for k, v in model.config.to_dict().items() if k.endswith("_bias") and flags_before.get(k) != v}
    model.save_pretrained(out)
    tok.save_pretrained(out)
    say(f"baked {st.meta.get('method')} steering at strength {args.strength:g} into {out}"
        + (f" (config flags set: {', '.join(f'{k}={v}' for k, v in flags.items())})" if flags else ""))
    if not args.no_verify:
        from transformers import AutoModelForCausalLM

        with no_hf_bars():
            reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        with torch.no_grad():
            got = reloaded(**probe).logits
        err = float((got - want).abs().max())
        ok = err <= 1e-4 * max(1.0, float(want.abs().max()))
        say(f"verified: stock transformers reload vs hooks-steered logits, max |Δ| = {err:.2e}"
            + ("" if ok else "  (LARGER THAN EXPECTED)"))
    say(f"load it anywhere with: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
