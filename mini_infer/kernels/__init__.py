"""Triton kernels, each beside its PyTorch reference (generated from the chapters)."""
