"""orthofuse-jax: training-free fusion of orthogonal (GS) diffusion adapters in JAX.

Subpackages (arrows point one way): ``cli -> models -> fusion -> geometry``.

* :mod:`orthofuse_jax.geometry` -- pure JAX manifold math on stacked blocks.
* :mod:`orthofuse_jax.fusion` -- adapters as pytrees, merges, safetensors I/O.
* :mod:`orthofuse_jax.models` -- Flax SDXL: folding adapters into UNet parameters, generation, training.

Importing the package imports no JAX and changes nothing in the process; the runtime settings
below are for callers to apply (the command line applies them itself).
"""

from ._runtime import configure_cpu_threads, enable_compile_cache, prefer_cublas_gemm

__version__ = "0.1.0"
__all__ = ["configure_cpu_threads", "enable_compile_cache", "prefer_cublas_gemm"]
