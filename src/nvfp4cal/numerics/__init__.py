"""Numerics and infrastructure at the bottom: the NVFP4 format (the source of truth), the MSE, Hessian and
GPTQ references, the Triton kernels beside them, the run context with its one communication object, and
the user-facing errors. Nothing here imports anything above it."""
