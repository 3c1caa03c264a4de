"""CUDA C++ sources, compiled at first use (see hf_efficient.ops.jit)."""
