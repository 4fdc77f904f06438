"""Optional compiled CPU kernels, called from JAX as XLA FFI custom calls.

``_solve`` (built from ``solve.cc`` when the package is installed; a C++17 compiler is needed,
and without one the install still succeeds and this module reports it missing) holds batched
solves without pivoting for the Cayley maps (:func:`orthofuse_jax.geometry._linalg.solve_pd`)
and the Cayley maps themselves, fused with the skew part and, for the fast merge, with its
restoration (:func:`orthofuse_jax.geometry._linalg.cayley_map`), the points of a decomposed
geodesic (:func:`orthofuse_jax.geometry._linalg.geodesic_point`), the product-only exact merge
(``orthofuse_jax.fusion.merge._geodesic_matmul``: float32 input gets float32 products) and its
sweep over many t (``merge._geodesic_sweep_matmul``: the log once per block, then the geodesic's
Taylor coefficients).
Set ``ORTHOFUSE_JAX_NATIVE=0`` to use jaxlib's LAPACK solve instead; it is read when a function
is traced, so set it before the first merge (or call ``jax.clear_caches()``). The kernels are
written for AVX-512 (64-byte vectors, 32 registers) and are used only on CPUs that have it
(:func:`vectors_native`): compiled for AVX2 alone they ran 7x (fast merge) to 22x (exact merge)
slower per block, slower than XLA's own code. ``ORTHOFUSE_JAX_NATIVE=force`` uses them anyway.
A large call splits its blocks over the CPUs the process may run on (its affinity mask);
``ORTHOFUSE_JAX_THREADS=N``, read at every call, sets the number of threads.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

_KERNELS = {"solve": "Solve", "cayley": "Cayley", "point": "Point", "geodesic": "Geodesic", "sweep": "Sweep"}
_DTYPES = {"float32": "F32", "float64": "F64"}
_state: dict = {}


def library_path() -> str | None:
    """Where the built ``_solve`` library is, or None if it was not built."""
    spec = importlib.util.find_spec(f"{__name__}._solve")
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _target_name(kernel: str, dtype: str) -> str:
    return f"orthofuse_{kernel}_f{dtype[-2:]}"


def target(kernel: str, dtype) -> str | None:
    """The registered FFI target of ``kernel`` (``"solve"``, ``"cayley"``, ``"point"``, ``"geodesic"``,
    ``"sweep"``) for ``dtype``, or None (not built, disabled by ``ORTHOFUSE_JAX_NATIVE=0``, a CPU
    without AVX-512 (:func:`vectors_native`), or another dtype). Registration is tried once per
    process."""
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
    """Whether the kernels are built and run on this CPU (:func:`vectors_native`, or
    ``ORTHOFUSE_JAX_NATIVE=force``); :func:`target` also needs them switched on."""
    return library_path() is not None and (_forced() or vectors_native())


def _forced() -> bool:
    return os.environ.get("ORTHOFUSE_JAX_NATIVE", "").lower() == "force"


def vectors_native() -> bool:
    """Whether this CPU runs the kernels' vectors as written (x86-64 with AVX-512F), asked of the
    built library (``OrthofuseVectorsNative``); False when it was not built. Where it is False the
    kernels are not registered (the merges run in XLA) unless ``ORTHOFUSE_JAX_NATIVE=force``."""
    path = library_path()
    if path is None:
        return False
    try:
        return bool(ctypes.CDLL(path).OrthofuseVectorsNative())
    except (OSError, AttributeError):  # pragma: no cover - a broken or older build
        return False


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
