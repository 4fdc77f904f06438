"""Build step for the optional compiled CPU kernels (everything else is in pyproject.toml).

``orthofuse_jax/_native/ffi.cc`` binds the CPU kernels of ``orthofuse_jax/_native/kernels.inc``
as XLA FFI custom calls (batched solves without pivoting, the Cayley maps, the points of a
decomposed geodesic, the exact merge and its sweep), built as ``orthofuse_jax._native._kernels``.
It needs a C++17 compiler; the XLA FFI headers are vendored under
``orthofuse_jax/_native/include``, so no jaxlib is needed at build time. The extension is
optional: if it does not compile, the install goes on and the package uses XLA and jaxlib's
LAPACK instead.
"""

import os

from setuptools import Extension, setup

here = os.path.dirname(os.path.abspath(__file__))
include = os.path.join(here, "orthofuse_jax", "_native", "include")

setup(
    ext_modules=[
        Extension(
            "orthofuse_jax._native._kernels",
            sources=["orthofuse_jax/_native/ffi.cc"],
            depends=[
                "orthofuse_jax/_native/kernels.inc"
            ],  # included twice: the AVX-512 and AVX2 builds
            language="c++",
            # -isystem: the vendored XLA headers' own warnings are not ours
            extra_compile_args=["-std=c++17", "-O3", "-pthread", "-Wno-psabi", "-isystem", include],
            extra_link_args=["-pthread"],  # the kernels split large batches over threads
            optional=True,
        )
    ]
)
