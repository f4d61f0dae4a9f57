"""Triton kernels, one family per module. Launchers take tensors and derive dimensions."""
