"""Block-level alternatives for the solves of the merges, timed on one SDXL-sized stack.

    python -m benchmarks.experiments.solves [--b 40] [--blocks 11520] [--reps 5]

Every variant runs on ``blocks`` skew blocks ``S`` of size ``b`` whose Cayley rotations are 0.1 to
1 rad (the benchmark workload; ``||S||_2 <= tan(0.5) = 0.55``) and reports median wall time, median
process CPU time (all threads; the machine is shared, so CPU time is the steadier number) and the
max abs error against the plain ``solve`` formulation. Variants:

* ``matmul``           one batched ``S @ S`` (the unit of cost)
* ``cay.solve``        ``solve(I - S, I + S)``             (geometry.cayley today)
* ``cay.inv``          ``inv(I - S) @ (I + S)``
* ``cay.cholesky``     ``(I + S)^2 (I - S^2)^{-1}`` with a Cholesky solve (``I - S^2`` is SPD)
* ``cay.product``      ``(I + S) prod_k (I + S^(2^k))``, k = 0..K (valid for ||S|| < 1; K = 4)
* ``cay.neumann_ns``   Newton-Schulz inverse of ``I - S`` from ``X0 = I + S`` (valid for ||S|| < 1)
* ``cay2.twice``       ``Cay(eta Cay(S))`` -- the fast merge's two solves (Cayley space + curve_over_id)
* ``cay2.fused``       the same in ONE solve: ``(I - S^2 + 2 eta S)(I - S^2 - 2 eta S)^{-1}``
* ``eigh``             ``eigh(-S^2)`` (the geodesic / exact restoration decomposition)
* ``*.split2``         the same op on two halves inside one jit (do the halves run on both cores?)
* ``cay.solve.bminor`` / ``matmul.bminor``  batch-minor layout ``[b, b, N]`` with broadcast-multiply-reduce
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import common


def variants(b: int, eta: float = 0.98, K: int = 4):
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    eye = jnp.eye(b, dtype=jnp.float32)

    def cay_solve(s):
        return jnp.linalg.solve(eye - s, jnp.broadcast_to(eye + s, s.shape))

    def cay_inv(s):
        return jnp.linalg.inv(eye - s) @ (eye + s)

    def cay_chol(s):
        p = eye - s @ s
        q = (eye + s) @ (eye + s)
        c = jsl.cho_factor(p, lower=True)
        # (I+S)^2 P^{-1} = (P^{-1} (I-S)^2)^T ... P symmetric and commuting: P^{-1} Q = Q P^{-1}.
        return jsl.cho_solve(c, q)

    def cay_product(s):
        acc = eye + s
        pw = s
        for _ in range(K):
            pw = pw @ pw
            acc = acc @ (eye + pw)
        return (eye + s) @ acc

    def cay_ns(s):
        a = eye - s
        x = eye + s  # ~ (I - S)^{-1} to first order
        for _ in range(4):
            x = x @ (2.0 * eye - a @ x)
        return (eye + s) @ x

    def skewp(u):
        return 0.5 * (u - jnp.swapaxes(u, -1, -2))

    def cay2_twice(s):
        return cay_solve(skewp(eta * cay_solve(s)))

    def cay2_fused(s):
        s2 = s @ s
        return jnp.linalg.solve(eye - s2 - 2 * eta * s, jnp.broadcast_to(eye - s2 + 2 * eta * s, s.shape))

    def eigh(s):
        m = jnp.swapaxes(s, -1, -2) @ s
        return jnp.linalg.eigh(0.5 * (m + jnp.swapaxes(m, -1, -2)))[1]

    def mm(s):
        return s @ s

    def split2(f):
        def g(s):
            h = s.shape[0] // 2
            return jnp.concatenate([f(s[:h]), f(s[h:])])

        return g

    def mm_bminor(s):
        x = jnp.transpose(s, (1, 2, 0))  # [b, b, N]
        y = jnp.sum(x[:, :, None, :] * x[None, :, :, :], axis=1)
        return jnp.transpose(y, (2, 0, 1))

    out = {
        "matmul": mm,
        "matmul.bminor": mm_bminor,
        "cay.solve": cay_solve,
        "cay.solve.split2": split2(cay_solve),
        "cay.inv": cay_inv,
        "cay.cholesky": cay_chol,
        "cay.product": cay_product,
        "cay.neumann_ns": cay_ns,
        "cay2.twice": cay2_twice,
        "cay2.fused": cay2_fused,
        "eigh": eigh,
        "eigh.split2": split2(eigh),
    }
    return {k: jax.jit(v) for k, v in out.items()}


def torch_variants(b: int):
    import torch

    eye = torch.eye(b)

    def cay(s):
        return torch.linalg.solve(eye - s, eye + s, left=False)

    return {
        "torch.matmul": lambda s: s @ s,
        "torch.cay.solve": cay,
        "torch.eigh": lambda s: torch.linalg.eigh(s.transpose(-1, -2) @ s)[1],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=40)
    p.add_argument("--blocks", type=int, default=11520, help="default: the L (or R) blocks of all b=40 SDXL layers")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument("--torch", action="store_true", help="also time the torch equivalents")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    s_np = common.random_skew_blocks(rng, (args.blocks,), args.b)
    s = jnp.asarray(s_np)
    vs = variants(args.b)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only.split(",")}
    ref1 = np.asarray(vs["cay.solve"](s)) if "cay.solve" in vs else None
    ref2 = np.asarray(vs["cay2.twice"](s)) if "cay2.twice" in vs else None
    rows, res = [], {"machine": common.machine(), "args": vars(args), "variants": {}}
    unit = None
    for name, f in vs.items():
        tm = common.time_fn(lambda: jax.block_until_ready(f(s)), reps=args.reps)
        y = np.asarray(f(s))
        err = None
        if name.startswith("cay.") and ref1 is not None:
            err = float(np.max(np.abs(y - ref1)))
        elif name.startswith("cay2.") and ref2 is not None:
            err = float(np.max(np.abs(y - ref2)))
        elif name.startswith("matmul"):
            err = float(np.max(np.abs(y - s_np @ s_np)))
        if name == "matmul":
            unit = tm["cpu_median"]
        res["variants"][name] = {**tm, "max_abs_err": err}
        rows.append([name, common.fmt_s(tm["median"]), common.fmt_s(tm["cpu_median"]),
                     f"{tm['cpu_median'] / unit:.1f}" if unit else "-", "-" if err is None else f"{err:.1e}",
                     f"{tm['load1_before']:.1f}"])
        print(rows[-1], flush=True)
    if args.torch:
        import torch

        st = torch.from_numpy(s_np)
        for name, f in torch_variants(args.b).items():
            tm = common.time_fn(lambda: f(st), reps=args.reps)
            res["variants"][name] = tm
            rows.append([name, common.fmt_s(tm["median"]), common.fmt_s(tm["cpu_median"]),
                         f"{tm['cpu_median'] / unit:.1f}" if unit else "-", "-", f"{tm['load1_before']:.1f}"])
            print(rows[-1], flush=True)
    print(common.table(rows, ["variant", "wall (median)", "CPU (median)", "CPU / matmul", "max abs err", "load"]))
    path = common.write_json(f"experiments_solves_b{args.b}", res)
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
