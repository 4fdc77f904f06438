"""OrthoFuse merges of GS adapters: :func:`merge` and :func:`sweep`, their checks and reports.

One convention everywhere: ``t = 0`` is the first (concept) adapter, ``t = 1`` the second (style);
N adapters take a probability vector of weights in adapter order. Every merge acts block by block,
independently on the L stack and the R stack; the perfect shuffle is untouched (docs/math.md §3).
The block-level maps are in :mod:`orthofuse_jax.fusion.maps`.

Methods (``method=``):

* ``"geodesic"`` -- the full OrthoFuse merge (docs/math.md §3.1, paper eq. (4)): ``Y(t) = U1 (U1^T U2)^t``,
  exact in real arithmetic (inverse Cayley + ``eigh``; :mod:`orthofuse_jax.geometry.spectral`).
  N adapters: the weighted Karcher mean (:mod:`orthofuse_jax.fusion.karcher`).
* ``"cayley"`` -- the fast merge (docs/math.md §3.2, paper eq. (38)): ``Y(t) = Cay((1-t) skew(A1) + t skew(A2))``
  on RAW Cayley parameters. N adapters: ``Cay(sum_i w_i skew(A_i))``.

Spectra restoration (``restore=``), with the phase multiplier (paper eqs. (6)-(8), docs/math.md §3.3)

    f(t) = 1 + 4 (alpha - 1) t (1 - t)            (two adapters; f(0) = f(1) = 1, f(1/2) = alpha)
    f(w) = 1 + 2 (alpha - 1) (1 - sum_i w_i^2)    (N adapters; equals f(t) for w = (1 - t, t):
                                                   1 - (1-t)^2 - t^2 = 2 t (1 - t))

* ``"none"``: ``Y``.
* ``"cayley"``: ``Cay(eta Y)``, ``eta = f / 2``; with ``alpha = 2`` this is exactly the reference's
  ``curve_over_id`` (``eta = 0.5 + 2 p (1 - p)``, docs/math.md §3.3) used by both presets (``p = t`` for
  ``moft_merge``, ``p = 1 - t`` for ``moft_merge_fast``; eta is symmetric so both equal ``p = t``).
  Like the reference it does not restore the endpoints exactly (``theta -> theta - theta^3/4`` at
  t = 0, 1) and caps rotations at pi/2.
* ``"exact"``: ``exp(f log Y)`` (paper eq. (6)), computed as a real spectral map of the rotation
  angles; ``f = 1`` at the endpoints, so t = 0 and t = 1 return the inputs.

Reference bugs we do not reproduce (docs/math.md §8): the eig-based log with ``V^H`` for ``V^{-1}`` (9.1) and
the branch cut at -1 (9.2) -- we use the real principal log, and a block with an eigenvalue at -1
(no real log) raises :class:`MergeError` naming the layer (NaN under ``jit``) instead of silently
returning a non-orthogonal block; the opposite t conventions (9.10) -- one convention here; the
exact-float ``sum(ts) == 1`` assertion (9.4) -- a tolerance here; in-place mutation (9.7) -- all
functions are pure. The style scales are dropped only under ``scales="concept"`` (9.11, docs/math.md §3.5).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from .._runtime import warn_cpu_threads
from ..geometry import DEFAULT_ANGLE_TOL, is_concrete
from ._dispatch import (
    Options,
    mean_stack,
    merge_pair,
    resolve_algorithm,
    stack_inputs,
)
from .adapter import GSAdapter, LayerStack, check_compatible, to_orthogonal
from .maps import orthogonality_error
from .scales import SCALE_RULES, combine_scales

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "RESTORES",
    "MergeError",
    "MergeReport",
    "merge",
    "merge_report",
    "sweep",
]

METHODS = ("geodesic", "cayley")
RESTORES = ("none", "cayley", "exact")
ALGORITHMS = ("auto", "eigh", "matmul")


class MergeError(ValueError):
    """A merge is undefined for some layer (e.g. a block with an eigenvalue at -1); names the layer."""


def merge(
    adapters: Sequence[GSAdapter],
    weights=None,
    *,
    t=None,
    method: str = "geodesic",
    restore: str = "none",
    alpha=2.0,
    scales: str = "concept",
    extrapolate: bool = False,
    angle_tol: float = DEFAULT_ANGLE_TOL,
    algorithm: str = "auto",
    weight_tol: float = 1e-6,
    karcher_tol: float = 1e-6,
    karcher_max_iter: int = 50,
) -> GSAdapter:
    """Merge GS adapters block by block into one adapter of orthogonal blocks (module docstring).

    Two adapters: give ``t`` (0 = first/concept, 1 = second/style). Reference presets:
    ``moft_merge --t T`` is ``merge([c, s], t=T, method="geodesic", restore="cayley")`` and
    ``moft_merge_fast --t T`` is ``merge([c, s], t=T, method="cayley", restore="cayley")``.
    N adapters: give ``weights`` (a probability vector, checked to ``weight_tol``); ``geodesic``
    is then the weighted Karcher mean (for two adapters it equals the geodesic point at
    ``t = weights[1]``), ``cayley`` the weighted Cayley-space mean, and restoration uses
    ``f = 1 + 2 (alpha - 1)(1 - sum w_i^2)``.

    Inputs may hold raw Cayley parameters or orthogonal blocks: ``geodesic`` maps raw ones through
    ``Cay``; ``cayley`` needs raw parameters and recovers them from orthogonal blocks with
    ``invCay`` (:func:`~orthofuse_jax.fusion.adapter.to_cayley_params`). All adapters are cast to
    the first one's dtype.

    Usable under ``jax.jit``: bind the options (``functools.partial(merge, method=..., restore=...)``)
    and pass adapters, ``t`` or ``weights`` as arguments. On concrete arrays the t range, the
    weights and the result are checked; under ``jit`` these checks are skipped and undefined
    blocks come back as NaN.

    Args:
      adapters: sequence of compatible :class:`GSAdapter` (same layers and block shapes).
      weights: ``[N]`` probability vector (exclusive with ``t``).
      t: interpolation parameter for exactly two adapters.
      method: ``"geodesic"`` or ``"cayley"``.
      restore: ``"none"``, ``"cayley"`` (reference ``curve_over_id`` for alpha = 2) or ``"exact"``.
      alpha: restoration strength, ``f(1/2) = alpha`` (paper eq. (8)).
      scales: ``"concept"``, ``"geometric"`` or ``"linear"`` (:mod:`orthofuse_jax.fusion.scales`).
      extrapolate: allow t outside [0, 1] (and negative weights).
      angle_tol: how close to pi a rotation angle may come before the log counts as undefined.
      algorithm: how the two-adapter geodesic and the exact restoration take logs and
        exponentials: ``"matmul"`` (products only; ``eigh`` only for a stack with a rotation
        angle above 2.4 rad), ``"eigh"`` (the spectral formula) or ``"auto"`` (``"matmul"`` for
        float32, ``"eigh"`` for float64: the polynomial is exact to float32 round-off, ~1e-8).
        ``"matmul"`` is faster, most of all on GPUs (no batched ``eigh``, no host round trip in
        an eager merge); on the CPU, with the compiled kernels built, the two-adapter merge is
        one pass per block (float32 products for float32 input, its blocks split over the
        process's CPUs). Declined blocks are redone with ``eigh`` after every
        stack was dispatched (under ``jit``: inside the program, by ``jax.lax.cond``); the first
        call that meets one compiles that ``eigh`` kernel for the stack's shape, once.
      weight_tol: tolerance of the ``sum(weights) == 1`` check.
      karcher_tol, karcher_max_iter: stopping rule of the Karcher iteration (N >= 3 geodesic);
        a warning is issued on concrete input when it stops without reaching the tolerance.

    Returns:
      A :class:`GSAdapter` with ``orthogonal=True`` and the combined scales.

    Raises:
      ValueError: bad option, t, weights or incompatible adapters (message names the value/layer).
      MergeError: a merged or intermediate block has an eigenvalue at -1 (message names the layer).
    """
    _check_options(method, restore, scales, algorithm)
    warn_cpu_threads()
    adapters = list(adapters)
    algorithm = resolve_algorithm(
        algorithm, sweep=False, dtype=adapters[0].dtype if adapters else jnp.float32
    )
    k = len(adapters)
    if k == 0:
        raise ValueError("merge needs at least one adapter")
    check_compatible(adapters)
    if t is not None and weights is not None:
        raise ValueError("give either t (two adapters) or weights (N adapters), not both")
    dtype = adapters[0].dtype
    if t is not None:
        if k != 2:
            raise ValueError(
                f"t is for merging exactly two adapters, got {k}; pass weights instead"
            )
        _check_t(t, extrapolate)
        xp = (
            jnp if isinstance(t, jax.core.Tracer) else np
        )  # concrete: no device programs for two numbers
        t = xp.asarray(t, dtype=dtype)
        if t.ndim:
            raise ValueError(
                f"t must be a scalar, got shape {t.shape}; use sweep() for several values"
            )
        w = xp.stack([1.0 - t, t])
    elif weights is None:
        if k == 1:
            w = jnp.ones((1,), dtype)
        else:
            raise ValueError(f"merging {k} adapters needs t (two adapters) or weights")
    else:
        _check_weights(weights, k, extrapolate, weight_tol)
        w = jnp.asarray(weights, dtype=dtype)
        if k == 2:
            t = w[1]  # the two-adapter Karcher mean / Cayley mean is the path point at t = w[1]
    stacks, flags = {}, {}
    info = []
    if k == 2:
        orthogonal = (adapters[0].orthogonal, adapters[1].orthogonal)
        two = merge_pair(
            adapters, t, alpha, Options(method, restore, algorithm, angle_tol, orthogonal)
        )
    else:
        mean = Options(
            method,
            restore,
            angle_tol=angle_tol,
            karcher_tol=karcher_tol,
            karcher_max_iter=karcher_max_iter,
        )
    for key in adapters[0].stacks:
        out, per = {}, {}
        for which in ("L", "R"):
            if k == 2:
                y, bad = two.pop((key, which))
            else:
                blocks = stack_inputs(adapters, key, which, method, dtype)
                y, bad, res, it = mean_stack(jnp.stack(blocks), w, alpha, mean)
                if method == "geodesic":
                    info.append((key, which, res, it))
                del blocks  # before the next stack is converted
            out[which], per[which] = y, bad
        stacks[key] = replace(adapters[0].stacks[key], L=out["L"], R=out["R"])
        flags[key] = per
    if is_concrete(adapters, t, w):
        _raise_if_bad(flags, stacks, method, restore)
        for key, which, res, it in info:
            if not float(res) <= karcher_tol:
                warnings.warn(
                    f"Karcher mean of stack {key} ({which}) stopped after {int(it)} iterations with residual "
                    f"{float(res):.3g} > karcher_tol = {karcher_tol}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    sc = combine_scales(adapters, w, scales, dtype=dtype)
    return GSAdapter(stacks=stacks, scales=sc, orthogonal=True, side=adapters[0].side)


def sweep(
    adapter1: GSAdapter,
    adapter2: GSAdapter,
    ts,
    *,
    method: str = "geodesic",
    restore: str = "none",
    alpha=2.0,
    scales: str = "concept",
    extrapolate: bool = False,
    angle_tol: float = DEFAULT_ANGLE_TOL,
    algorithm: str = "auto",
    reuse: GSAdapter | None = None,
) -> GSAdapter:
    """Merge two adapters at every ``t`` in ``ts`` in one vmapped call per stack.

    Equals ``[merge([adapter1, adapter2], t=t, ...) for t in ts]`` stacked on a new leading axis,
    but the t-independent work is done once per sweep:

    * ``algorithm="matmul"``: the relative rotation's log by products; on the CPU, with the
      compiled kernels, one pass per block then also builds the Taylor coefficients of the whole
      geodesic ``U1 expm(t X) = sum_k t^k M_k`` (in double, as many as the largest ``|t|`` needs),
      and each t costs an n^2 pass per term plus its restoration (``"cayley"``: one inversion).
      Elsewhere each t takes its own exponential (about 13 products).
    * ``algorithm="eigh"``: the inverse Cayley of ``U1^T U2`` and its ``eigh``
      (:func:`orthofuse_jax.geometry.geodesic_path`); each t then costs 3 products.

    ``restore="exact"`` adds, per t, the log and exponential of the merged block. ``algorithm`` as
    in :func:`merge`, but for float32 ``"auto"`` is ``"matmul"`` only where the compiled CPU
    kernel runs it (several times less arithmetic than ``eigh``), and ``"eigh"`` elsewhere (where
    the products' exponential per t costs more than ``eigh``'s 3 products per t).

    ``reuse``: the result of an earlier ``sweep`` of the same shapes (the adapters' stacks, the
    number of t, the dtype), whose memory this sweep's result takes over; it is consumed (its
    stacks are donated, as with ``jax.jit(..., donate_argnums=...)``, and deleted). A sweep writes
    16 times a merge's output (4.8 GB for two SDXL adapters); without ``reuse`` every call faults
    in that much fresh memory, and on virtual machines whose host takes freed pages back that
    can cost as much as the arithmetic. Inside a ``jax.jit`` trace it is
    ignored: donate through your own ``jit`` there.

    Returns:
      A :class:`GSAdapter` (``orthogonal=True``) whose stacks are ``[T, layers, nb, b, b]`` and
      whose scales are ``[T, h]``.
    Raises:
      As :func:`merge`; the :class:`MergeError` message also gives the offending t. ``ValueError``
      naming the stack when ``reuse`` does not fit this sweep or was already consumed (nothing
      is donated then); a :class:`MergeError` is raised after the kernels ran, so ``reuse`` is
      consumed by then.
    """
    _check_options(method, restore, scales, algorithm)
    warn_cpu_threads()
    algorithm = resolve_algorithm(algorithm, sweep=True, dtype=adapter1.dtype, adapter=adapter1)
    check_compatible([adapter1, adapter2])
    _check_t(ts, extrapolate, "ts")
    dtype = adapter1.dtype
    ts = (jnp if isinstance(ts, jax.Array) else np).asarray(ts, dtype=dtype)  # keeps a layout
    if ts.ndim != 1:
        raise ValueError(f"ts must be a 1-D array of t values, got shape {ts.shape}")
    if reuse is not None:
        _check_reuse(reuse, adapter1, ts.shape[0], dtype)
    stacks, flags = {}, {}
    orthogonal = (adapter1.orthogonal, adapter2.orthogonal)
    opts = Options(method, restore, algorithm, angle_tol, orthogonal, sweep=True)
    two = merge_pair([adapter1, adapter2], ts, alpha, opts, reuse=reuse)
    for key in adapter1.stacks:
        out, per = {}, {}
        for which in ("L", "R"):
            out[which], per[which] = two.pop((key, which))
        stacks[key] = replace(adapter1.stacks[key], L=out["L"], R=out["R"])
        flags[key] = per
    if is_concrete(adapter1, adapter2, ts):
        _raise_if_bad(flags, stacks, method, restore, ts=ts)
    w = (jnp if isinstance(ts, jax.core.Tracer) else np).stack([1.0 - ts, ts], axis=-1)
    sc = combine_scales([adapter1, adapter2], w, scales, dtype=dtype)
    return GSAdapter(stacks=stacks, scales=sc, orthogonal=True, side=adapter1.side)


def _check_options(method, restore, scales, algorithm) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if restore not in RESTORES:
        raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
    if scales not in SCALE_RULES:
        raise ValueError(f"scales must be one of {SCALE_RULES}, got {scales!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def _check_t(t, extrapolate: bool, what: str = "t") -> None:
    if isinstance(t, jax.core.Tracer):
        return
    arr = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    if not extrapolate and (np.any(arr < 0.0) or np.any(arr > 1.0)):
        bad = arr[(arr < 0.0) | (arr > 1.0)].ravel()[0]
        raise ValueError(
            f"{what} = {float(bad)} is outside [0, 1]; pass extrapolate=True to extrapolate along the path"
        )


def _check_reuse(reuse, adapter: GSAdapter, n_t: int, dtype) -> None:
    """Raise (naming the stack) unless every stack of ``reuse`` can hold a sweep of ``adapter``
    at ``n_t`` points: ``[n_t, *stack shape]`` of ``dtype``, distinct arrays, none deleted."""
    if not isinstance(reuse, GSAdapter):
        raise TypeError(
            f"reuse must be the GSAdapter an earlier sweep() returned, got {type(reuse).__name__}"
        )
    if set(reuse.stacks) != set(adapter.stacks):
        raise ValueError(
            f"reuse: its stacks {sorted(reuse.stacks)} are not the adapters' {sorted(adapter.stacks)}"
        )
    seen = set()
    for key, st in adapter.stacks.items():
        for which in ("L", "R"):
            x = getattr(reuse.stacks[key], which)
            if isinstance(x, jax.core.Tracer):
                continue
            where = f"reuse: stack {key} {which}"
            if not isinstance(x, jax.Array):
                raise TypeError(
                    f"{where} is a {type(x).__name__}, not a jax.Array (an earlier sweep's result)"
                )
            if x.is_deleted():
                raise ValueError(
                    f"{where} was already deleted: an earlier call consumed it (a sweep's result "
                    "can be reused once; pass the latest one)"
                )
            want = (n_t, *getattr(st, which).shape)
            if x.shape != want or x.dtype != dtype:
                raise ValueError(
                    f"{where} is {x.dtype}{list(x.shape)}; this sweep's result is "
                    f"{jnp.dtype(dtype)}{list(want)} (the same adapters' shapes and number of t)"
                )
            if id(x) in seen:
                raise ValueError(
                    f"{where} is the same array as another of its stacks; each must be its own"
                )
            seen.add(id(x))


def _check_weights(w, k: int, extrapolate: bool, tol: float) -> None:
    if np.shape(w) != (k,):
        raise ValueError(f"weights must have shape ({k},) for {k} adapters, got {np.shape(w)}")
    if isinstance(w, jax.core.Tracer):
        return
    arr = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"weights must be finite, got {arr.tolist()}")
    if not extrapolate and np.any(arr < 0):
        i = int(np.argmax(arr < 0))
        raise ValueError(
            f"weights[{i}] = {arr[i]} is negative; weights must be a probability vector"
        )
    if abs(arr.sum() - 1.0) > tol:
        raise ValueError(
            f"weights must sum to 1 (tolerance {tol}), got sum {arr.sum()!r} for {arr.tolist()}"
        )


_WHY = {
    "geodesic": "the relative rotation U1^T U2 (or, for N adapters, M^T U_i in the Karcher iteration) "
    "has an eigenvalue at -1, where the real principal logarithm is undefined",
    "cayley": "an input orthogonal block has an eigenvalue at -1 (no Cayley parameter) or is not finite",
}


def _raise_if_bad(
    flags: dict, stacks: dict[str, LayerStack], method: str, restore: str, ts=None
) -> None:
    for key, per in flags.items():
        for which in ("L", "R"):
            bad = np.asarray(per[which])
            if not bad.any():
                continue
            idx = np.argwhere(bad)[0]
            layer, block = stacks[key].names[int(idx[-2])], int(idx[-1])
            at = f" at t = {float(np.asarray(ts)[int(idx[0])])}" if ts is not None else ""
            why = _WHY[method]
            if restore == "exact":
                why += ", or the merged block has an eigenvalue at -1 (restore='exact' needs its logarithm)"
            raise MergeError(
                f"layer {layer!r}: merged {which} block {block}{at} is undefined ({int(bad.sum())} bad block(s) "
                f"in stack {key}): {why}"
            )


# ------------------------------------------------------------------------------------------------
# Reports.


@dataclass(frozen=True)
class MergeReport:
    """Orthogonality of a merged adapter: ``per_layer[name] = max ||U^T U - I||_max`` over its L and R blocks."""

    per_layer: dict[str, float]
    max_error: float
    worst_layer: str | None
    nonfinite_layers: tuple[str, ...]


def merge_report(adapter: GSAdapter) -> MergeReport:
    """Per-layer maximum orthogonality error of an adapter's blocks (raw adapters are mapped through Cay).

    Works for :func:`sweep` results too (the maximum is also taken over the t axis). A layer with
    non-finite blocks is listed in ``nonfinite_layers`` and reported with error ``inf``.
    """
    adapter = to_orthogonal(adapter)
    per: dict[str, float] = {}
    nonfinite = []
    for s in adapter.stacks.values():
        err = jnp.maximum(orthogonality_error(s.L), orthogonality_error(s.R))  # [..., layers, nb]
        e = np.asarray(err).reshape(-1, len(s.names), s.nb)
        e = np.where(np.isfinite(e), e, np.inf).max(axis=(0, 2))
        for name, v in zip(s.names, e):
            per[name] = float(v)
            if not np.isfinite(v):
                nonfinite.append(name)
    worst = max(per, key=lambda name: per[name]) if per else None
    return MergeReport(
        per_layer=per,
        max_error=per[worst] if worst is not None else 0.0,
        worst_layer=worst,
        nonfinite_layers=tuple(nonfinite),
    )
