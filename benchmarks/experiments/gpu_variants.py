"""GPU: which eigh implementation for the full-SDXL merges, and the primitives' costs.

    python -m benchmarks.experiments.gpu_variants [--out DIR] [--layers-check 4] [--no-baseline] [--no-primitives]

On an accelerator: times the primitives at the SDXL stack shapes (matmul at default and HIGHEST
precision, solve, eigh QR vs Jacobi), then, for each ``eigh`` implementation (batched Jacobi
``syevj``, XLA's default QR/``syevd``), times ``jax.jit(merge)`` on the full SDXL inventory
(exact, fast; for the first also exact restoration and the 16-point sweep; medians of 3 after
the compiling call) and checks the first ``--layers-check`` layers of each block size against
the reference algorithm run in float64 on the CPU (``benchmarks/reference_torch.py``).
Variants are labelled ``precision=default`` for history: the library's products are
``Precision.HIGHEST`` regardless. Writes ``gpu_variants.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import orthofuse_jax  # noqa: F401

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import reference_torch as ref
from orthofuse_jax.fusion.merge import merge, sweep
from orthofuse_jax.geometry import spectral


_timed = common.first_and_median


def _eigh_sq_with(impl):
    def _eigh_sq(s):
        m = jnp.swapaxes(s, -1, -2) @ s
        v, lam = jax.lax.linalg.eigh(m, implementation=impl)
        return jnp.maximum(lam, 0.0), v

    return _eigh_sq


def _reference_subset(c_np, s_np, t, k):
    """Reference merges (float64, torch on CPU) of the first k layers of each block size."""
    import torch

    out = {}
    for b in c_np:
        lay = lambda d: [(torch.from_numpy(d[b][0][i]).double(), torch.from_numpy(d[b][1][i]).double())  # noqa: E731
                         for i in range(k)]
        full = ref.moft_merge(lay(c_np), lay(s_np), t)
        fast = ref.moft_merge_fast({b: (torch.from_numpy(c_np[b][0][:k]).double(), torch.from_numpy(c_np[b][1][:k]).double())},
                                   {b: (torch.from_numpy(s_np[b][0][:k]).double(), torch.from_numpy(s_np[b][1][:k]).double())}, t)
        out[b] = {"exact": (np.stack([x[0].numpy() for x in full]), np.stack([x[1].numpy() for x in full])),
                  "fast": (fast[b][0].numpy(), fast[b][1].numpy())}
    return out


def _err(adapter, refs, which, k):
    e = 0.0
    for s in adapter.stacks.values():
        L, R = refs[s.b][which]
        e = max(e, float(np.max(np.abs(np.asarray(s.L[:k], np.float64) - L))),
                float(np.max(np.abs(np.asarray(s.R[:k], np.float64) - R))))
    return e


def _baseline_probe(c_np, s_np, t, res, n_layers=10):
    """The torch baseline on the same device: the fast preset on everything, the eig loop on a few b=64 layers."""
    import torch

    if not torch.cuda.is_available():
        return
    dev = "cuda"
    c = {b: (torch.from_numpy(L).to(dev), torch.from_numpy(R).to(dev)) for b, (L, R) in c_np.items()}
    s = {b: (torch.from_numpy(L).to(dev), torch.from_numpy(R).to(dev)) for b, (L, R) in s_np.items()}

    def fast():
        ref.moft_merge_fast(c, s, t)
        torch.cuda.synchronize()

    b = max(c)
    lay = lambda d: [(d[b][0][i], d[b][1][i]) for i in range(n_layers)]  # noqa: E731

    def full():
        ref.moft_merge(lay(c), lay(s), t)
        torch.cuda.synchronize()

    res["baseline_cuda"] = {"fast_full_inventory": _timed(fast, reps=5),
                            f"full_{n_layers}_layers_b{b}": _timed(full, reps=2)}
    print("baseline cuda", json.dumps(res["baseline_cuda"]), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--layers-check", type=int, default=4)
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--inventory", default=None)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-primitives", action="store_true")
    args = p.parse_args(argv)
    inv = common.SDXL_INVENTORY if not args.inventory else common.parse_inventory(args.inventory)
    t, k = args.t, args.layers_check
    res = {"machine": common.machine(), "device_kind": jax.devices()[0].device_kind, "variants": {}, "primitives": {}}
    print(json.dumps({x: res["machine"][x] for x in ("jax", "jaxlib", "jax_backend", "torch")}), res["device_kind"], flush=True)
    c_np, s_np = common.make_pair(inv, seed=0)
    a1, a2 = common.to_adapter(c_np), common.to_adapter(s_np)
    t0 = time.perf_counter()
    refs = _reference_subset(c_np, s_np, t, k)
    print(f"# float64 reference on {k} layers per size: {time.perf_counter() - t0:.1f} s", flush=True)
    impls = {"qr": None, "jacobi": jax.lax.linalg.EighImplementation.JACOBI}
    # primitives at the SDXL stack shapes (one L stack of each size)
    key = jax.random.PRNGKey(0)
    for b, n in ({} if args.no_primitives else inv).items():
        x = jax.random.normal(key, (n, 32, b, b), jnp.float32) * 0.1
        sym = x @ jnp.swapaxes(x, -1, -2)
        eye = jnp.eye(b, dtype=jnp.float32)
        row = {}
        prims = {
            "matmul_default": jax.jit(lambda x: x @ x),
            "matmul_highest": jax.jit(lambda x: jnp.matmul(x, x, precision="highest")),
            "solve": jax.jit(lambda x: jnp.linalg.solve(eye + x, eye - x)),
            "eigh_qr": jax.jit(lambda m: jax.lax.linalg.eigh(m)),
            "eigh_jacobi": jax.jit(lambda m: jax.lax.linalg.eigh(m, implementation=impls["jacobi"])),
        }
        for pn, f in prims.items():
            arg = sym if pn.startswith("eigh") else x
            try:
                row[pn] = _timed(lambda: f(arg), reps=10)["median"]
            except Exception as e:  # noqa: BLE001
                row[pn] = repr(e)[:300]
        res["primitives"][f"b={b},blocks={n * 32}"] = row
        print(f"b={b} blocks={n * 32}", json.dumps(row), flush=True)
    ts = jnp.linspace(0.0, 1.0, 16, dtype=jnp.float32)
    orig = spectral._eigh_sq
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "gpu_variants.json").write_text(json.dumps(res, indent=2, default=str))  # noqa: E731
    save()
    for iname, prec in (("jacobi", "default"), ("qr", "default")):
            impl = impls[iname]
            name = f"eigh={iname},precision={prec}"
            spectral._eigh_sq = orig if impl is None else _eigh_sq_with(impl)
            jax.clear_caches()
            row = {}
            try:
                with jax.default_matmul_precision(None if prec == "default" else "highest"):
                    fns = {
                        "exact": jax.jit(lambda x, y, t: merge([x, y], t=t, method="geodesic", restore="cayley")),
                        "fast": jax.jit(lambda x, y, t: merge([x, y], t=t, method="cayley", restore="cayley")),
                    }
                    if not res["variants"]:  # the first variant only: the sweep and the exact restoration
                        fns["exact_restore"] = jax.jit(lambda x, y, t: merge([x, y], t=t, method="geodesic", restore="exact"))
                        fns["sweep16"] = jax.jit(lambda x, y, ts: sweep(x, y, ts, method="geodesic", restore="cayley"))
                    tf = jnp.float32(t)
                    for key, f in fns.items():
                        arg = ts if key == "sweep16" else tf
                        row[key] = _timed(lambda: f(a1, a2, arg).stacks, reps=3)
                        print(f"  {name} {key}: {row[key]}", flush=True)
                    if len(fns) > 2:
                        row["eager_exact"] = _timed(lambda: merge([a1, a2], t=t, method="geodesic", restore="cayley").stacks, reps=3)
                    row["err_exact_vs_ref64"] = _err(fns["exact"](a1, a2, tf), refs, "exact", k)
                    row["err_fast_vs_ref64"] = _err(fns["fast"](a1, a2, tf), refs, "fast", k)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:2000]
            res["variants"][name] = row
            print(name, json.dumps(row), flush=True)
            save()
    spectral._eigh_sq = orig
    if not args.no_baseline:
        _baseline_probe(c_np, s_np, t, res)
    save()



if __name__ == "__main__":
    main()
