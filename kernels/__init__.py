"""Triton kernels, installed as ``lineas_fast.kernels`` (see ``package_dir`` in setup.py).

Empty for now: the LayerNorm / RMSNorm (+ Gemma variant) + sparse-affine kernels, forward and
backward, arrive with the kernels issue.
"""
