"""Benchmarks of the OrthoFuse merges (not part of the installed package).

* :mod:`benchmarks.merge_sdxl` -- full SDXL adapter inventory, ours vs the PyTorch reference.
* :mod:`benchmarks.scaling` -- block size at fixed parameter count, and number of layers.
* :mod:`benchmarks.reference_torch` -- the BASELINE: a transcription of the reference algorithm.
* :mod:`benchmarks.experiments` -- alternative formulations of the Cayley / log / power solves.
"""
