"""Evaluation (SPEC §5): the protocol metrics (:mod:`.metrics`) and the method comparison
(:mod:`.compare`, written out by :mod:`.write`).

``lf.evaluate.toxicity(texts)``, ``lf.evaluate.perplexity(model, tok, texts)``,
``lf.evaluate.continuations(model, tok, prompts)``, ``lf.evaluate.compare(methods, strengths)``.
"""

from .compare import DEFAULT_METHODS, MULTIPLIERS, STRENGTHS, best_at_budget, compare
from .metrics import (continuations, evaluate_model, evaluate_steering, fluencies, fluency, fluency_of,
                      is_degenerate, paired_bootstrap, perplexity, summary_row, toxicity)
from .write import write_comparison

__all__ = ["DEFAULT_METHODS", "MULTIPLIERS", "STRENGTHS", "best_at_budget", "compare", "continuations",
           "evaluate_model", "evaluate_steering", "fluencies", "fluency", "fluency_of", "is_degenerate",
           "paired_bootstrap", "perplexity", "summary_row", "toxicity", "write_comparison"]
