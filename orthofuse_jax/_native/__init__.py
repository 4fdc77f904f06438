"""Optional compiled CPU kernels, called from JAX as XLA FFI custom calls.

``_kernels`` (built when the package is installed from ``ffi.cc``, the XLA FFI handlers, and
``kernels.inc``, the kernels they run; a C++17 compiler is needed, and without one the install still
succeeds and this module reports it missing) holds batched solves without pivoting for the Cayley
maps (:func:`orthofuse_jax.geometry._linalg.solve_pd`) and the Cayley maps themselves, fused with
the skew part and, for the fast merge, with its restoration
(:func:`orthofuse_jax.geometry._linalg.cayley_map`), the points of a decomposed geodesic
(:func:`orthofuse_jax.geometry._linalg.geodesic_point`), the product-only exact merge
(``orthofuse_jax.fusion._dispatch._geodesic_matmul``: float32 input gets float32 products) and its
sweep over many t (``_dispatch._geodesic_sweep_matmul``: the log once per block, then the geodesic's
Taylor coefficients).
Set ``ORTHOFUSE_JAX_NATIVE=0`` to use jaxlib's LAPACK solve instead; it is read when a function
is traced, so set it before the first merge (or call ``jax.clear_caches()``). The kernels are
built twice on x86-64, for AVX-512 and for AVX2 with FMA (vector widths and register tiles of
their own), and every call runs the build the CPU has (:func:`isa`); on a CPU with neither, and
on other architectures, the merges run in XLA (``ORTHOFUSE_JAX_NATIVE=force`` uses the portable
build of other architectures anyway). ``ORTHOFUSE_JAX_ISA=avx2``, read at every call, runs the
AVX2 build on an AVX-512 CPU (for tests and benchmarks).
A large call splits its blocks over the CPUs the process may run on (its affinity mask);
``ORTHOFUSE_JAX_THREADS=N``, read at every call, sets the number of threads.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

_KERNELS = {
    "solve": "Solve",
    "cayley": "Cayley",
    "point": "Point",
    "geodesic": "Geodesic",
    "sweep": "Sweep",
}
_DTYPES = {"float32": "F32", "float64": "F64"}
_state: dict = {}


def library_path() -> str | None:
    """Where the built ``_kernels`` library is, or None if it was not built."""
    spec = importlib.util.find_spec(f"{__name__}._kernels")
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _target_name(kernel: str, dtype: str) -> str:
    return f"orthofuse_{kernel}_f{dtype[-2:]}"


def target(kernel: str, dtype) -> str | None:
    """The registered FFI target of ``kernel`` (``"solve"``, ``"cayley"``, ``"point"``, ``"geodesic"``,
    ``"sweep"``) for ``dtype``, or None (not built, disabled by ``ORTHOFUSE_JAX_NATIVE=0``, no
    build for this CPU (:func:`isa`), or another dtype). Registration is tried once per process."""
    if not enabled():
        return None
    name = getattr(dtype, "name", str(dtype))
    if name not in _DTYPES:
        return None
    if "ok" not in _state:
        _state["ok"] = _register()
    return _target_name(kernel, name) if _state["ok"] else None


def enabled() -> bool:
    """False when ``ORTHOFUSE_JAX_NATIVE`` is ``0``/``off``/``false``/``no``: then the package's own
    kernels (these and the GPU solve of ``geometry/_pallas.py``) are not used."""
    return os.environ.get("ORTHOFUSE_JAX_NATIVE", "1").lower() not in ("0", "off", "false", "no")


def available() -> bool:
    """Whether the kernels are built and run on this CPU (:func:`vectors_native`, or the portable
    build with ``ORTHOFUSE_JAX_NATIVE=force``); :func:`target` also needs them switched on."""
    return library_path() is not None and (vectors_native() or (_forced() and isa() == "portable"))


def _forced() -> bool:
    return os.environ.get("ORTHOFUSE_JAX_NATIVE", "").lower() == "force"


_ISA_NAMES = {2: "avx512", 1: "avx2", -1: "portable"}


def isa() -> str | None:
    """Which build of the kernels a call runs on this CPU, asked of the built library
    (``OrthofuseIsa``): ``"avx512"`` (AVX-512F), ``"avx2"`` (AVX2 with FMA, or any AVX-512 CPU
    with ``ORTHOFUSE_JAX_ISA=avx2``), ``"portable"`` (not x86-64, or not built by GCC: untuned,
    used only when forced), or None (not built, or an x86-64 CPU with neither)."""
    path = library_path()
    if path is None:
        return None
    try:
        return _ISA_NAMES.get(int(ctypes.CDLL(path).OrthofuseIsa()))
    except (OSError, AttributeError):  # pragma: no cover - a broken or older build
        return None


def vectors_native() -> bool:
    """Whether a build tuned for this CPU's vectors runs here (:func:`isa` is ``"avx512"`` or
    ``"avx2"``). Where it is False the kernels are not registered (the merges run in XLA) unless
    the portable build is forced with ``ORTHOFUSE_JAX_NATIVE=force``."""
    return isa() in ("avx512", "avx2")


def solve_target(dtype) -> str | None:
    """The registered FFI target of the no-pivot solve for ``dtype``, or None (not built, disabled, other dtype)."""
    return target("solve", dtype)


def _register() -> bool:
    if not available():
        return False
    path = library_path()
    import jax

    try:
        lib = ctypes.CDLL(path)
        for kernel, symbol in _KERNELS.items():
            for dtype, suffix in _DTYPES.items():
                handler = jax.ffi.pycapsule(getattr(lib, f"Orthofuse{symbol}{suffix}"))
                jax.ffi.register_ffi_target(_target_name(kernel, dtype), handler, platform="cpu")
    except (OSError, AttributeError):  # pragma: no cover - a broken build: fall back to LAPACK
        return False
    return True
