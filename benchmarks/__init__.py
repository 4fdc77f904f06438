"""Benchmarks of the OrthoFuse merges (not part of the installed package).

* :mod:`benchmarks.merge_sdxl` -- full SDXL adapter inventory, ours vs the PyTorch reference.
* :mod:`benchmarks.scaling` -- block size at fixed parameter count, and number of layers.
* :mod:`benchmarks.reference_torch` -- the BASELINE: a transcription of the reference algorithm.
* :mod:`benchmarks.end_to_end` -- the command line's commands as whole processes, beside the reference's.
* :mod:`benchmarks.fold_sdxl`, :mod:`benchmarks.denoise_step`, :mod:`benchmarks.train_step` -- the
  SDXL weight folding, one UNet call, one training step.

``benchmarks/RESULTS.md`` gives each figure's command, machine and result file;
``docs/performance.md`` explains them and lists the alternatives tried.
"""
