"""Optional compiled CPU kernels, called from JAX as XLA FFI custom calls.

``_solve`` (built from ``solve.cc`` when the package is installed; a C++17 compiler is needed,
and without one the install still succeeds and this module reports it missing) holds batched
solves without pivoting for the Cayley maps (:func:`orthofuse_jax.geometry._linalg.solve_pd`).
Set ``ORTHOFUSE_JAX_NATIVE=0`` to use jaxlib's LAPACK solve instead; it is read when a function
is traced, so set it before the first merge (or call ``jax.clear_caches()``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

_TARGETS = {"float32": "orthofuse_solve_f32", "float64": "orthofuse_solve_f64"}
_SYMBOLS = {"float32": "OrthofuseSolveF32", "float64": "OrthofuseSolveF64"}
_state: dict = {}


def library_path() -> str | None:
    """Where the built ``_solve`` library is, or None if it was not built."""
    spec = importlib.util.find_spec(f"{__name__}._solve")
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def solve_target(dtype) -> str | None:
    """The registered FFI target of the no-pivot solve for ``dtype``, or None (not built, disabled, other dtype)."""
    if os.environ.get("ORTHOFUSE_JAX_NATIVE", "1").lower() in ("0", "off", "false", "no"):
        return None
    name = getattr(dtype, "name", str(dtype))
    if name not in _TARGETS:
        return None
    if "ok" not in _state:
        _state["ok"] = _register()
    return _TARGETS[name] if _state["ok"] else None


def _register() -> bool:
    path = library_path()
    if path is None:
        return False
    import jax

    try:
        lib = ctypes.CDLL(path)
        for dtype, target in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[dtype])), platform="cpu")
    except (OSError, AttributeError):  # pragma: no cover - a broken build: fall back to LAPACK
        return False
    return True
