"""Process-level runtime settings: CPU threads for old jaxlib, the compilation cache, GPU products.

Nothing here runs at import; the command line applies what it needs before JAX starts, and
library users call the same functions (or set the variables) themselves.

jaxlib 0.10's CPU LAPACK kernels (``solve``'s LU, ``eigh``, ...) split a batch across XLA's
intra-op thread pool and block a pool thread while they wait for the pieces
(``jax::ParallelBatchMap``). When a compiled program runs as many independent LAPACK calls at
once as the pool has threads -- e.g. the L and R stacks of one merge on a 2-core machine -- every
pool thread waits and nothing runs: the process hangs at 0 % CPU (jaxlib 0.11 removed that
parallel path). A pool of one thread (``PJRT_NPROC=1``, read when the CPU backend starts) makes
the kernels run inline, which cannot deadlock and, for the many small blocks of a GS adapter, is
also faster on 2 cores. :func:`configure_cpu_threads` sets it where the installed jaxlib needs
it; :func:`warn_cpu_threads` (called by the merges) warns a library user whose process could hang.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

_ENV = "PJRT_NPROC"
_OPT_OUT = "ORTHOFUSE_JAX_KEEP_THREADS"


@functools.cache
def jaxlib_needs_one_thread() -> bool:
    """Whether the installed jaxlib has the batched LAPACK pool deadlock (versions before 0.11)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) < (0, 11)


def _cpu_backend() -> bool:
    try:
        import jax

        return jax.default_backend() == "cpu"
    except Exception:  # pragma: no cover
        return False


def _backends_started() -> bool:
    """Whether a JAX backend runs already (XLA has then read ``XLA_FLAGS`` and ``PJRT_NPROC``)."""
    if "jax" not in sys.modules:  # no JAX yet, so no backend either (and no need to import it)
        return False
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except Exception:  # pragma: no cover - private API moved; setting the variables is still right
        return False


def configure_cpu_threads() -> bool:
    """Set ``PJRT_NPROC=1`` where the installed jaxlib needs it (before 0.11) and it can still take
    effect (no JAX backend started yet); return True if it is in effect.

    Call it before your first JAX computation, or export ``PJRT_NPROC=1`` yourself. A value you
    set is kept, and ``ORTHOFUSE_JAX_KEEP_THREADS=1`` leaves the runtime alone.
    """
    if os.environ.get(_OPT_OUT) or not jaxlib_needs_one_thread():
        return False
    if _ENV in os.environ:
        return os.environ[_ENV] == "1"
    if _backends_started():
        return False
    os.environ[_ENV] = "1"
    return True


_warned = False


def warn_cpu_threads() -> None:
    """Warn once, naming the fix, where a merge on this process's CPU backend could hang (jaxlib
    before 0.11, more than one XLA thread, ``PJRT_NPROC`` not 1)."""
    global _warned
    if (
        _warned
        or os.environ.get(_OPT_OUT)
        or os.environ.get(_ENV) == "1"
        or not jaxlib_needs_one_thread()
    ):
        return
    if (os.cpu_count() or 1) < 2 or not _cpu_backend():
        return
    _warned = True
    warnings.warn(
        "jaxlib < 0.11's batched CPU LAPACK kernels can deadlock XLA's thread pool when several run at "
        "once; export PJRT_NPROC=1 before starting Python, or call orthofuse_jax.configure_cpu_threads() "
        "before the first JAX computation (ORTHOFUSE_JAX_KEEP_THREADS=1 silences this)",
        RuntimeWarning,
        stacklevel=3,
    )


_CACHE_ENV = "ORTHOFUSE_JAX_COMPILE_CACHE"


def default_compile_cache_dir() -> str:
    """``$XDG_CACHE_HOME/orthofuse-jax/jax`` (``~/.cache/orthofuse-jax/jax`` if unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "orthofuse-jax", "jax")


def enable_compile_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for the command line; return its folder or None.

    A merge compiles a few kernels per block size on every new process: 3 s on a CPU, and tens of
    seconds for the full SDXL inventory on a GPU. With the cache a second
    ``orthofuse-jax fuse`` loads them from disk instead. The folder is ``$ORTHOFUSE_JAX_COMPILE_CACHE``
    if set (``off`` disables the cache), else :func:`default_compile_cache_dir`. A cache folder
    the user already gave JAX (``JAX_COMPILATION_CACHE_DIR``) is left alone, and a folder that
    cannot be created only costs the cache, never the command.
    """
    choice = os.environ.get(_CACHE_ENV, "")
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if current:
        return current
    path = choice or default_compile_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            return None
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Our kernels compile in well under JAX's default 1 s threshold each, but there are many.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # unbounded by default: keep the least recently used 1 GB
    if jax.config.jax_compilation_cache_max_size == -1:  # type: ignore[attr-defined]
        jax.config.update("jax_compilation_cache_max_size", 2**30)
    return path


_TRITON_FLAG = "--xla_gpu_enable_triton_gemm=false"
_KEEP_FLAGS_ENV = "ORTHOFUSE_JAX_KEEP_XLA_FLAGS"


def prefer_cublas_gemm() -> bool:
    """Let XLA's GPU compiler use cuBLAS, not autotuned Triton kernels, for products; True if set.

    A merge traces hundreds of small batched products. On an H100, autotuning a Triton kernel for
    each made the first exact merge compile for 105 s; with ``--xla_gpu_enable_triton_gemm=false``
    it compiled in 22 s and ran as fast (eager exact merge 49.9 vs 48.3 ms, ``jit(merge)`` of the
    fast merge 10.0 ms; turning autotuning off instead, ``--xla_gpu_autotune_level=0``, also
    compiled in 22 s but ran 27% slower; docs/performance.md).

    The merge commands of the CLI call this before JAX starts; a library user can call
    ``orthofuse_jax.prefer_cublas_gemm()`` first thing, or set the flag in ``XLA_FLAGS``
    themselves. The flag is added to ``XLA_FLAGS`` unless that already names ``triton_gemm``
    or ``ORTHOFUSE_JAX_KEEP_XLA_FLAGS`` is set. Once a JAX backend runs, XLA has read its flags:
    nothing changes, with a :class:`RuntimeWarning` if that backend is a GPU. CPU-only runs
    ignore the flag.
    """
    if os.environ.get(_KEEP_FLAGS_ENV):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "triton_gemm" in flags:
        return _TRITON_FLAG in flags.split()
    if _backends_started():
        import jax

        if jax.default_backend() == "gpu":
            warnings.warn(
                "prefer_cublas_gemm() was called after JAX's GPU backend started, so XLA keeps "
                f"autotuning Triton products (slow first compiles); call it before any JAX "
                f"computation or export XLA_FLAGS={_TRITON_FLAG}",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_TRITON_FLAG}".strip()
    return True
