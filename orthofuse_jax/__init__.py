"""orthofuse-jax: training-free fusion of orthogonal (GS) diffusion adapters in JAX.

Subpackages (arrows point one way): ``cli -> models -> fusion -> geometry``.

* :mod:`orthofuse_jax.geometry` -- pure JAX manifold math on stacked blocks.
* :mod:`orthofuse_jax.fusion` -- adapters as pytrees, merges, safetensors I/O.
* :mod:`orthofuse_jax.models` -- Flax SDXL: folding adapters into UNet parameters, generation, training.
"""

from ._runtime import configure_cpu_threads as _configure_cpu_threads
from ._runtime import prefer_cublas_gemm

_configure_cpu_threads()

__version__ = "0.1.0"
__all__ = ["prefer_cublas_gemm"]
