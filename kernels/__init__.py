"""Triton kernels of hf_paged, installed as ``hf_paged.kernels``.

Kept free of imports on purpose: when Python runs with the repository root on ``sys.path``,
transformers' availability probe for Hugging Face's ``kernels`` package may import this folder
once as ``kernels``; importing triton or torch here would make that probe slow.
"""
