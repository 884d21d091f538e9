"""Kernels for the MoE hot path. Import from `mogelm.kernels.ops` only; it picks the backend."""
