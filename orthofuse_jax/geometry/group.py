"""The group action behind the GS manifold and its stabilizer (paper App. A/B).

The group ``G = SO(b)^nb x SO(b)^nb`` acts on ``O(n)`` (``n = nb b``) by

    (A, B) . X = P^T BD(A) P  X  BD(B)^T.

The orbit of the identity is the set of GS matrices: ``(L, R^T) . I = P^T BD(L) P BD(R) = Q(L, R)``,
and the action maps GS matrices to GS matrices: ``(A, B) . Q(L, R) = Q(A L, R B^T)``.
The orbit is the homogeneous space ``G / Stab(I)`` with

    Stab(I) = {(A, B) : P^T BD(A) P = BD(B)},

whose Lie algebra is the kernel of the differential of the orbit map at the identity,
``(a, b) -> P^T BD(a) P - BD(b)`` on skew ``a, b``.

Dimension of the stabilizer, derived by hand. ``P^T BD(a) P`` couples only indices in the
same residue class modulo ``nb`` (the "strided" groups ``{u nb + v}``), ``BD(b)`` only indices in
the same contiguous block ``{j b + i}``. Every skew generator of either factor touches exactly
one unordered index pair, so the kernel is spanned by pairs ``{k, k'}`` that lie in one contiguous
block *and* one residue class, each giving one dimension. A contiguous run of ``b = q nb + r``
indices holds ``r`` residues ``q + 1`` times and ``nb - r`` residues ``q`` times, hence

    dim Stab = nb * ( r * C(q + 1, 2) + (nb - r) * C(q, 2) ),      q, r = divmod(b, nb).

For ``b <= nb`` (q = 0, or q = 1 with r = 0) this is 0: the stabilizer is discrete (paper Lemma 2)
and the GS manifold has dimension ``dim G = nb b (b - 1)``. Example with ``b > nb``:
``nb = 2, b = 4`` (q = 2, r = 0) gives ``dim Stab = 2 * 2 * C(2, 2) = 4`` -- the pairs
{0,2}, {1,3}, {4,6}, {5,7} -- and an orbit of dimension ``24 - 4 = 20``.
:func:`stabilizer_dimension` measures the same number numerically (an SVD of the linearised
map), and the tests compare the two.

The discrete part contains the sign patterns: for any ``d`` in ``{+-1}^n`` put ``A = diag(d)``
in blocks and ``B = P^T A P`` (again diagonal); then ``(A, B)`` fixes ``I`` and
``Q(L A, B R) = Q(L, R)`` for every GS matrix (a fibre of the parametrisation).
"""

from __future__ import annotations

from math import comb

import jax.numpy as jnp
import numpy as np

from ._types import Array, Blocks, Float
from .gs import apply_blocks, gs_apply
from .shuffle import perfect_unshuffle

__all__ = [
    "act",
    "group_dimension",
    "orbit_dimension",
    "orbit_map",
    "sign_stabilizer_element",
    "stabilizer_dimension",
    "stabilizer_dimension_formula",
    "stabilizer_is_discrete",
]


def act(a: Blocks, b: Blocks, x: Float[Array, "*batch n n"]) -> Float[Array, "*batch n n"]:
    """``(A, B) . X = P^T BD(A) P X BD(B)^T`` without densifying the group element."""
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    # Columns of X transformed by P^T BD(A) P = Q(A, I): rows of X^T through gs_apply.
    left = jnp.swapaxes(gs_apply(jnp.swapaxes(x, -1, -2), a, eye), -1, -2)
    # Rows of (.) BD(B)^T are BD(B) applied to each row.
    return apply_blocks(b, left, transpose=False)


def orbit_map(a: Blocks, b: Blocks) -> Float[Array, "n n"]:
    """``(A, B) . I``; the GS matrix ``Q(L, R)`` is ``orbit_map(L, R^T)``."""
    n = a.shape[-3] * a.shape[-1]
    return act(a, b, jnp.eye(n, dtype=a.dtype))


def group_dimension(nb: int, b: int) -> int:
    """``dim G = 2 nb b (b - 1) / 2``."""
    return nb * b * (b - 1)


def stabilizer_dimension_formula(nb: int, b: int) -> int:
    """Closed form of ``dim Stab(I)`` derived in the module docstring."""
    q, r = divmod(b, nb)
    return nb * (r * comb(q + 1, 2) + (nb - r) * comb(q, 2))


def _linearised_orbit_map(nb: int, b: int):
    """Sparse matrix of ``(a, b) -> P^T BD(a) P - BD(b)`` on a basis of so(b)^nb x so(b)^nb.

    Rows index the n*n entries of the image; the P^T . P part is evaluated with the library's
    own shuffle (``perfect_unshuffle`` of the index vector), not with the closed form.
    """
    n = nb * b
    iu, ju = np.triu_indices(b, k=1)
    # Position of BD entry m after conjugation: (P^T M P)[i, k] = M[pinv[i], pinv[k]].
    to_orig = np.asarray(perfect_unshuffle(jnp.arange(n), nb))  # (P^T w)[i] = w[to_orig^-1...]
    # perfect_unshuffle(arange)[i] = index m with (P^T e)[i] fed from position m, so the BD
    # entry at position m lands at original index where to_orig == m:
    where = np.empty(n, dtype=np.int64)
    where[to_orig] = np.arange(n)
    rows, cols, vals = [], [], []
    col = 0
    for side, sign in (("a", 1.0), ("b", -1.0)):
        for blk in range(nb):
            p = blk * b + iu
            q = blk * b + ju
            if side == "a":
                p, q = where[p], where[q]
            k = np.arange(col, col + len(iu))
            rows += [p * n + q, q * n + p]
            cols += [k, k]
            vals += [np.full(len(k), sign), np.full(len(k), -sign)]
            col += len(iu)
    import scipy.sparse as sp  # here, not at import: scipy.sparse takes 0.3 s to load

    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n * n, col)
    )


def stabilizer_dimension(nb: int, b: int, *, rtol: float = 1e-8) -> int:
    """Numerical ``dim Stab(I)``: the nullity of the linearised orbit map (float64).

    The squared singular values of the sparse Jacobian ``J`` are the eigenvalues of
    ``J^T J``, which splits into independent blocks (its connected components); blocks of equal
    size are densified together and passed to a batched ``eigvalsh``. A singular value counts
    as zero when it is below ``rtol * sigma_max``.
    """
    from scipy.sparse.csgraph import connected_components

    jac = _linearised_orbit_map(nb, b)
    if jac.shape[1] == 0:
        return 0
    gram = (jac.T @ jac).tocsr()
    ncomp, labels = connected_components(gram, directed=False)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=ncomp)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    eig = []
    for k in np.unique(sizes):
        comps = np.nonzero(sizes == k)[0]
        cols = order[starts[comps][:, None] + np.arange(k)]  # [m, k]
        r = np.repeat(cols, k, axis=1).reshape(-1)
        c = np.tile(cols, (1, k)).reshape(-1)
        dense = np.asarray(gram[r, c]).reshape(len(comps), k, k)
        eig.append(np.linalg.eigvalsh(dense).reshape(-1))
    sv = np.sqrt(np.maximum(np.concatenate(eig), 0.0))
    return int(np.sum(sv <= rtol * sv.max()))


def stabilizer_is_discrete(nb: int, b: int) -> bool:
    """True when the stabilizer of I has dimension 0 (paper Lemma 2: ``b <= nb``)."""
    return stabilizer_dimension(nb, b) == 0


def orbit_dimension(nb: int, b: int) -> int:
    """Dimension of the GS manifold: ``dim G - dim Stab(I)``."""
    return group_dimension(nb, b) - stabilizer_dimension(nb, b)


def sign_stabilizer_element(signs: Float[Array, "nb b"]) -> tuple[Blocks, Blocks]:
    """Diagonal stabilizer element ``(A, B)`` with ``A = diag(signs)``, ``B = P^T A P``.

    ``Q(L A, B R) = Q(L, R)`` for all L, R. Blocks of A or B have determinant -1 when they hold
    an odd number of -1 signs (then the pair lies in ``O(b)^nb``, not ``SO(b)^nb``).
    """
    signs = jnp.asarray(signs)
    nb, b = signs.shape
    flat_b = perfect_unshuffle(signs.reshape(nb * b), nb).reshape(nb, b)
    diag = lambda d: d[..., :, None] * jnp.eye(b, dtype=d.dtype)
    return diag(signs), diag(flat_b)
