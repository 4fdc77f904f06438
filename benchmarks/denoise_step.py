"""Denoising-step time: base UNet vs adapter folded into the params vs the on-the-fly wrapper.

One step = one jitted UNet call on a CFG batch of 2 (as in SDXL sampling), float32, CPU. The
folded UNet runs the same executable as the base one with different kernel values, so its ratio
to the base must be 1.00 (within timing noise); the on-the-fly wrapper
(:func:`orthofuse_jax.models.apply_onthefly`, what the reference does) pays two butterfly
products per adapted projection per call. Variants are timed in interleaved rounds (the comment
in :func:`bench` explains the three ratios reported).

Configs: ``tiny`` (the test suite's SDXL-shaped UNet, 8x8 latents) and ``medium`` (SDXL
block types at reduced width: channels 64/128/256, transformer depth 1/1/2, cross-attention
width 320, 32x32 latents, 77 tokens). Random weights from the parameter shapes (no init pass, no download).

Usage: ``python benchmarks/denoise_step.py [--configs tiny medium] [--rounds 5] [--calls 3]``.
Writes ``benchmarks/results/denoise_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from orthofuse_jax.models.configs import MEDIUM_SDXL_UNET as MEDIUM
from orthofuse_jax.models.configs import TINY_SDXL_UNET as TINY

CONFIGS = {"tiny": (TINY, 4, 77), "medium": (MEDIUM, 32, 77)}  # config, GS nb, tokens


def _random_params(unet, seed=0):
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    vals = [
        jax.random.normal(k, s.shape, jnp.float32) * (0.5 / max(1, s.shape[0]) ** 0.5)
        for k, s in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, vals)


def _adapter(table, nb, seed=0):
    import numpy as np

    from orthofuse_jax.fusion.adapter import from_layers

    rng = np.random.default_rng(seed)
    layers, scales = {}, {}
    for name, spec in table.items():
        b = spec.n_in // nb
        A = rng.standard_normal((2, nb, b, b)).astype(np.float32) * 0.1
        layers[name] = (A[0] - A[0].swapaxes(-1, -2), A[1] - A[1].swapaxes(-1, -2))
        scales[name] = (1 + 0.1 * rng.standard_normal(spec.n_out)).astype(np.float32)
    return from_layers(layers, scales)


def bench(name: str, rounds: int, calls: int) -> dict:
    import jax
    import jax.numpy as jnp

    from orthofuse_jax.fusion.adapter import to_orthogonal
    from orthofuse_jax.models import apply_onthefly, attention_layers, patch_unet_params
    from orthofuse_jax.models._backbone import build_unet

    cfg, nb, tokens = CONFIGS[name]
    unet = build_unet(cfg)
    params = _random_params(unet)
    table = attention_layers(cfg)
    adapter = to_orthogonal(_adapter(table, nb))
    t0 = time.perf_counter()
    patched = jax.block_until_ready(patch_unet_params(params, adapter, config=cfg))
    fold_s = time.perf_counter() - t0
    s = cfg["sample_size"]
    text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (2, 4, s, s))
    t = jnp.array([981.0, 981.0])
    ctx = jax.random.normal(k[1], (2, tokens, cfg["cross_attention_dim"]))
    added = {
        "text_embeds": jax.random.normal(k[2], (2, text_dim)),
        "time_ids": jnp.ones((2, 6)) * s * 8,
    }

    step = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx, added).sample)
    otf = jax.jit(lambda p, a: apply_onthefly(unet, p, a, x, t, ctx, added, config=cfg).sample)
    variants = {
        "base": lambda: step(params),
        "patched": lambda: step(patched),
        "onthefly": lambda: otf(params, adapter),
    }
    compile_s = {}
    for v, f in variants.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        compile_s[v] = time.perf_counter() - t0
    # The CPU is shared: calls alternate between variants (rotating the order every round) so
    # each round's ratios compare calls made under the same load; we report the median of those
    # paired ratios, the ratio of the fastest calls, and the ratio of process CPU time (all XLA
    # threads), which waiting for a busy CPU does not inflate.
    names = list(variants)
    wall = {v: [] for v in names}
    cpu = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(variants[v]())
            wall[v].append((time.perf_counter() - t0) / calls)
            cpu[v].append((time.process_time() - c0) / calls)

    def paired(v):
        return statistics.median(a / b for a, b in zip(wall[v], wall["base"]))

    med = {v: statistics.median(ts) for v, ts in wall.items()}
    best = {v: min(ts) for v, ts in wall.items()}
    cpu_med = {v: statistics.median(ts) for v, ts in cpu.items()}
    return dict(
        config=name,
        adapted_layers=len(table),
        gs_nblocks=nb,
        latent=f"4x{s}x{s}",
        tokens=tokens,
        fold_s=fold_s,
        first_call_s=compile_s,
        step_s_median=med,
        step_s_min=best,
        step_cpu_s_median=cpu_med,
        step_s_all=wall,
        ratio_patched_over_base=paired("patched"),
        ratio_onthefly_over_base=paired("onthefly"),
        ratio_min_patched_over_base=best["patched"] / best["base"],
        ratio_min_onthefly_over_base=best["onthefly"] / best["base"],
        ratio_cpu_patched_over_base=cpu_med["patched"] / cpu_med["base"],
        ratio_cpu_onthefly_over_base=cpu_med["onthefly"] / cpu_med["base"],
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=sorted(CONFIGS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    results = [bench(c, args.rounds, args.calls) for c in args.configs]
    out = dict(
        machine=dict(
            platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()
        ),
        results=results,
    )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "denoise_step.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(
        f"Denoising step (CFG batch 2, float32) -- {os.cpu_count()} CPUs, {args.rounds} interleaved rounds"
    )
    print("ratios: median of paired per-round wall ratios | fastest call | median process CPU time")
    print(
        f"{'config':<8}{'layers':>7}{'base ms':>9}{'patched ms':>11}{'otf ms':>8}"
        f"{'patched/base':>24}{'on-the-fly/base':>24}{'fold ms':>9}"
    )
    for r in results:
        m = r["step_s_median"]
        pr = f"{r['ratio_patched_over_base']:.3f}|{r['ratio_min_patched_over_base']:.3f}|{r['ratio_cpu_patched_over_base']:.3f}"
        orr = f"{r['ratio_onthefly_over_base']:.3f}|{r['ratio_min_onthefly_over_base']:.3f}|{r['ratio_cpu_onthefly_over_base']:.3f}"
        print(
            f"{r['config']:<8}{r['adapted_layers']:>7}{m['base'] * 1e3:>9.1f}{m['patched'] * 1e3:>11.1f}"
            f"{m['onthefly'] * 1e3:>8.1f}{pr:>24}{orr:>24}{r['fold_s'] * 1e3:>9.0f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
