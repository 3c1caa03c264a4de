"""Benchmarks (``hf-efficient bench <area>``). Each writes its results under an output folder, by default
:data:`DEFAULT_OUT` in the current directory; the project's published figures live in ``docs/benchmarks``."""

DEFAULT_OUT = "hf_efficient_bench"
