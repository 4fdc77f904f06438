"""BASELINE ONLY -- a PyTorch transcription of the reference OrthoFuse merge code.

This module exists so that the benchmarks can time *our* merges against the algorithm of the
authors' repository (``moft/utils/gs_orthogonal.py``, ``moft/inferencer_sdxl.py``) side by side,
on the same machine and the same inputs. It is not used by the library and is deliberately
written the way the reference is, inefficiencies included:

* :func:`moft_merge` -- preset ``moft_merge`` (docs/math.md §4): a Python loop over the 560 GS layers,
  each one a :func:`blocked_geodesic_combination` (docs/math.md §3.1: general ``torch.linalg.eig`` of
  ``U2^T U1``, ``X = V diag(i Arg lambda) V^H``, complex ``matrix_exp``, real part) followed by
  :func:`postprocess_blocks` ``curve_over_id`` with parameter t (docs/math.md §3.3).
* :func:`moft_merge_fast` -- preset ``moft_merge_fast`` (docs/math.md §4): per block size, all layers
  stacked ``[B, 32, b, b]``; ``Cay(eta * Cay(t' A_c + (1 - t') A_s))`` with ``t' = 1 - t``
  (docs/math.md §3.2 ``merge_inside_cayley_space_batch`` + ``postprocess_blocks_batch``).

Conventions: L/R inputs are raw Cayley parameters ``[..., nb, b, b]``; ``t = 0`` gives the concept
(adapter 1), ``t = 1`` the style (adapter 2) for both presets (docs/math.md §3.4). Any float dtype works
(float64 for the parity test against the golden file, float32 for timing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "blocked_geodesic_combination",
    "cast_to_already_orthogonal_mode",
    "cayley",
    "merge_inside_cayley_space_batch",
    "moft_merge",
    "moft_merge_fast",
    "postprocess_blocks",
    "skew",
]


def skew(a: torch.Tensor) -> torch.Tensor:
    """``(A - A^T) / 2`` per block (docs/math.md §1.2)."""
    return (a - a.transpose(-1, -2)) / 2


def cayley(a: torch.Tensor) -> torch.Tensor:
    """``Cay(A)`` exactly as the reference codes it: solve ``U (I - S) = I + S`` (docs/math.md §1.2)."""
    s = skew(a)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    return torch.linalg.solve(eye - s, eye + s, left=False)


def cast_to_already_orthogonal_mode(
    L: torch.Tensor, R: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/math.md §3.1 for ``method="cayley"``: the orthogonal blocks ``Cay(L), Cay(R)``."""
    return cayley(L), cayley(R)


def _blocked_geodesic(u1: torch.Tensor, u2: torch.Tensor, t: float) -> torch.Tensor:
    """One stack of docs/math.md §3.1: ``U1 Re(expm(-t V diag(i Arg lambda) V^H))``, ``lambda, V = eig(U2^T U1)``."""
    m = torch.bmm(u2.transpose(-1, -2), u1)
    lam, v = torch.linalg.eig(m)
    # log|lambda| discarded, only the imaginary part (= Arg lambda) kept; V^H used instead of V^{-1}.
    x = v @ torch.diag_embed(1j * torch.log(lam).imag) @ v.transpose(-1, -2).conj()
    return torch.bmm(u1, torch.linalg.matrix_exp(-t * x).real)


@torch.no_grad()
def blocked_geodesic_combination(
    L1: torch.Tensor, R1: torch.Tensor, L2: torch.Tensor, R2: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/math.md §3.1 on one GS layer given by raw Cayley parameters ``[nb, b, b]``; t = 0 -> adapter 1."""
    U1L, U1R = cast_to_already_orthogonal_mode(L1, R1)
    U2L, U2R = cast_to_already_orthogonal_mode(L2, R2)
    return _blocked_geodesic(U1L, U2L, t), _blocked_geodesic(U1R, U2R, t)


def _eta(p: float) -> float:
    assert 0 <= p <= 1, "p should be in [0, 1]"
    return 0.5 + 2 * p * (1 - p)


@torch.no_grad()
def postprocess_blocks(
    L: torch.Tensor, R: torch.Tensor, parameter: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/math.md §3.3 ``curve_over_id`` on orthogonal blocks: ``Cay(eta U)``, ``eta = 0.5 + 2p(1-p)``."""
    eta = _eta(parameter)
    return cayley(eta * L), cayley(eta * R)


@torch.no_grad()
def merge_inside_cayley_space_batch(
    L1: torch.Tensor, R1: torch.Tensor, L2: torch.Tensor, R2: torch.Tensor, ts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/math.md §3.2: ``Cay(ts[0] A1 + ts[1] A2)`` for L and R (exact-float ``sum(ts) == 1`` assert kept)."""
    assert torch.all(ts >= 0) and torch.sum(ts) == 1
    return cayley(ts[0] * L1 + ts[1] * L2), cayley(ts[0] * R1 + ts[1] * R2)


@torch.no_grad()
def moft_merge(
    concept: Sequence[tuple[torch.Tensor, torch.Tensor]],
    style: Sequence[tuple[torch.Tensor, torch.Tensor]],
    t: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preset ``moft_merge`` (docs/math.md §4): one geodesic + ``curve_over_id(p=t)`` call per layer.

    Args:
      concept, style: per-layer raw Cayley parameters ``(L, R)``, each ``[nb, b, b]``, same order.
      t: user-facing t (0 = concept, 1 = style).
    Returns:
      Per-layer merged orthogonal blocks ``(L, R)``.
    """
    out = []
    for (L1, R1), (L2, R2) in zip(concept, style):
        L, R = blocked_geodesic_combination(L1, R1, L2, R2, t)
        out.append(postprocess_blocks(L, R, t))
    return out


@torch.no_grad()
def moft_merge_fast(
    concept: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    style: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    t: float,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Preset ``moft_merge_fast`` (docs/math.md §4) on stacks ``{b: (L [B, nb, b, b], R)}``.

    ``t' = 1 - t``; ``Cay(eta(t') Cay(t' A_c + (1 - t') A_s))`` for every stacked block.
    """
    tp = 1 - t
    out = {}
    for b in concept:
        L1, R1 = concept[b]
        L2, R2 = style[b]
        ts = torch.tensor([tp, 1 - tp], dtype=L1.dtype)
        L, R = merge_inside_cayley_space_batch(L1, R1, L2, R2, ts)
        out[b] = postprocess_blocks(L, R, tp)
    return out


def fuse_files(concept: str, style: str, output: str, t: float, *, fast: bool = False) -> None:
    """The reference's whole job as one process does it: load both adapter files with torch's
    safetensors, merge (``moft_merge`` or ``moft_merge_fast``), save the merged blocks."""
    from safetensors.torch import load_file, save_file

    a, b = load_file(concept), load_file(style)
    layers = sorted({k.rpartition(".ort_monarch.")[0] for k in a if ".ort_monarch." in k})
    pairs = [[(d[f"{n}.ort_monarch.L"], d[f"{n}.ort_monarch.R"]) for n in layers] for d in (a, b)]
    out: dict[str, torch.Tensor] = {}
    if fast:
        sizes = sorted({L.shape[-1] for L, _ in pairs[0]})
        stacks = [
            {
                s: tuple(torch.stack([p[i] for p in ps if p[0].shape[-1] == s]) for i in (0, 1))
                for s in sizes
            }
            for ps in pairs
        ]
        merged = moft_merge_fast(stacks[0], stacks[1], t)
        for s in sizes:
            names = [n for n, p in zip(layers, pairs[0]) if p[0].shape[-1] == s]
            for j, n in enumerate(names):
                out[f"{n}.ort_monarch.L"], out[f"{n}.ort_monarch.R"] = (
                    merged[s][0][j],
                    merged[s][1][j],
                )
    else:
        for n, (L, R) in zip(layers, moft_merge(pairs[0], pairs[1], t)):
            out[f"{n}.ort_monarch.L"], out[f"{n}.ort_monarch.R"] = L, R
    out.update({k: v for k, v in a.items() if ".ort_monarch." not in k})  # the concept's scales
    save_file({k: v.contiguous() for k, v in out.items()}, output, metadata={"format": "pt"})


if (
    __name__ == "__main__"
):  # python -m benchmarks.reference_torch CONCEPT STYLE OUT [--t 0.6] [--fast]
    import argparse

    parser = argparse.ArgumentParser(description=fuse_files.__doc__)
    parser.add_argument("concept")
    parser.add_argument("style")
    parser.add_argument("output")
    parser.add_argument("--t", type=float, default=0.6)
    parser.add_argument("--fast", action="store_true", help="moft_merge_fast instead of moft_merge")
    args = parser.parse_args()
    fuse_files(args.concept, args.style, args.output, args.t, fast=args.fast)
