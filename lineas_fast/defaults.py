"""Embedded defaults as plain data (no torch import): what ``lineas-fast --help`` shows and the library uses.

* :data:`LINEAS` — the LinEAS fit defaults, picked by the protocol on the eval slice (docs/tuning.md has
  every point of the sweep and its command): the MLP hidden neurons (sparser, more feature-like than the
  residual basis the norms see), every token a sample, the reference recipe's Adam betas and cosine
  decay, a transport term that matches the source to the target only at the last third of the sites
  (``transport_last=1/3``: the maps act at every site, but only where the model is about to write does the
  toxic text have to look like the target; matching every site also matched the prompts' wording), and a
  preservation term: ``preserve`` = μ weighs, against the transport term, how far the maps move each token
  of the target prompts from its own unsteered value (``preserve_loss="paired"``), which is what keeps
  perplexity on ordinary text low. 80 steps of 6 + 6 prompts at lr 1e-2 fit in 2–3 minutes on 2 CPU cores
  (106–124 s on 2 AVX-512 cores, about 150–170 s on slower pairs).
* :data:`SPARSITY_OPTIONS` — the LinEAS options a sparsity sweep (``lineas-fast eval --sparsity``) may set.
* :data:`METHOD_NAMES` — the fitting methods of :func:`lineas_fast.fit` (``lineas_fast.methods.METHODS``
  holds the functions; a test keeps the two equal).
* :data:`DEFAULT_MODEL`, :data:`DEMO_QUICK` — the demo's model and its ``--quick`` smoke settings.
"""

from __future__ import annotations

LINEAS = dict(sites="mlp_hidden", pooling="tokens", steps=80, lr=1e-2, schedule="cosine", lr_end=1e-3,
              betas=(0.9, 0.9), l1=0.0, group_l2=0.0, batch_size=6, normalize="var", optimizer="adam",
              preserve=2.0, preserve_loss="paired", transport_last=1 / 3, tol=0.0, window=20, refit_steps=0, density=1.0, partial=0.0, max_length=64, seed=0,
              autocast=False, compile=False)

SPARSITY_OPTIONS = ("l1", "group_l2", "density", "refit_steps")
"""The LinEAS options that make a fit sparse (a sweep over sparse settings varies only these)."""

METHOD_NAMES = ("lineas", "linear_act", "linear_act_incremental", "mean_act", "gaussian_ot", "actadd")

DEFAULT_MODEL = "smollm2-135m"
DEMO_QUICK = {"steps": 3, "prompts": 8, "passages": 3, "curve": (1.0,), "search_iters": 1}
