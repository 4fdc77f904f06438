"""GS adapter training step: ours (JAX, adapter folded inside the loss) vs the reference (torch,
on-the-fly GS layer), same UNet config, CPU.

One step = sample ``t`` and noise, UNet forward with the adapter on every attention projection,
epsilon MSE, backward to the adapter only (raw Cayley L/R + scales), AdamW update. Batch 1, 77
text tokens, float32. Implementations, each in its own subprocess (peak RSS is per process):

* ``jax-fold``: :func:`orthofuse_jax.models.train.make_train_step` (what ``orthofuse-jax train``
  runs): ``K_eff = (Q^T K) * s`` inside the loss, one jitted step, donated adapter/optimiser state.
* ``jax-onthefly``: the same step with the reference's per-call rotation ``s * W (Q x)`` through
  :func:`orthofuse_jax.models.apply_onthefly` (a Flax method interceptor), for the fold-vs-on-the-fly
  question inside JAX.
* ``torch-ref``: diffusers' torch ``UNet2DConditionModel`` with an attention processor written as
  the reference's ``MOFTCrossAttnProcessor`` (Cayley by ``torch.linalg.solve`` at every call, the
  docs/math.md §1.3 butterfly, scales after the projection), ``torch.optim.AdamW`` on the adapter only.

Configs: ``tiny`` (the test suite's SDXL-shaped UNet, 8x8 latents, nb 4) and ``medium`` (SDXL
block types at reduced width: channels 64/128/256, depth 1/1/2, cross width 320, 32x32 latents,
nb 32) -- the same two configs as ``benchmarks/denoise_step.py``. Random weights.

Usage: ``python benchmarks/train_step.py [--configs tiny medium] [--steps 10] [--impls ...]``.
Writes ``benchmarks/results/train_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from orthofuse_jax.models.configs import MEDIUM_SDXL_UNET as MEDIUM  # same configs as denoise_step
from orthofuse_jax.models.configs import TINY_SDXL_UNET as TINY

CONFIGS = {"tiny": (TINY, 4), "medium": (MEDIUM, 32)}  # config, GS nb
TOKENS = 77
IMPLS = ("jax-fold", "jax-onthefly", "torch-ref")


def _text_dim(cfg):
    return cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]


def _inputs(cfg, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    s = cfg["sample_size"]
    return dict(
        latents=rng.standard_normal((1, 4, s, s)).astype(np.float32),
        prompt_embeds=rng.standard_normal((1, TOKENS, cfg["cross_attention_dim"])).astype(
            np.float32
        ),
        text_embeds=rng.standard_normal((1, _text_dim(cfg))).astype(np.float32),
        time_ids=np.array([[s * 8, s * 8, 0, 0, s * 8, s * 8]], np.float32),
    )


def _jax_step(cfg, nb, impl):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from orthofuse_jax.geometry import cayley
    from orthofuse_jax.models import apply_onthefly
    from orthofuse_jax.models._backbone import build_unet
    from orthofuse_jax.models.generate import alphas_cumprod
    from orthofuse_jax.models.train import init_adapter, make_loss, make_optimizer, make_train_step

    unet = build_unet(cfg)
    shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, s.shape) * (0.5 / max(1, s.shape[0]) ** 0.5)
            for k, s in zip(keys, leaves)
        ],
    )
    adapter = init_adapter(cfg, nb)
    if impl == "jax-fold":
        loss = make_loss(unet, params, adapter, config=cfg)
    else:
        abar = jnp.asarray(alphas_cumprod(), jnp.float32)

        def loss(adapter, params, batch, key):
            x0 = batch["latents"]
            kt, kn = jax.random.split(key)
            t = jax.random.randint(kt, (x0.shape[0],), 0, 1000)
            noise = jax.random.normal(kn, x0.shape)
            a = abar[t][:, None, None, None]
            xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
            orth = adapter.map_stacks(cayley, orthogonal=True)  # as in the fold
            pred = apply_onthefly(
                unet,
                params,
                orth,
                xt,
                t,
                batch["prompt_embeds"],
                {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]},
                config=cfg,
            ).sample
            return jnp.mean((pred - noise) ** 2)

    opt = make_optimizer()
    step = make_train_step(loss, opt)
    state = opt.init(adapter)
    batch = {k: jnp.asarray(v) for k, v in _inputs(cfg).items()}
    key = jax.random.PRNGKey(1)
    holder = [adapter, state]

    def run():
        nonlocal key
        key, sub = jax.random.split(key)
        a, s, loss_v = step(holder[0], holder[1], params, batch, sub)
        holder[0], holder[1] = a, s
        return float(loss_v)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapter))
    return run, n_params


def _torch_step(cfg, nb):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("TRAIN_STEP_TORCH_THREADS", "1")))
    unet = UNet2DConditionModel(**cfg).train()
    for p in unet.parameters():
        p.requires_grad_(False)

    def cayley(A):
        S = (A - A.transpose(-1, -2)) / 2
        eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(S)
        return torch.linalg.solve(eye - S, eye + S, left=False)

    def butterfly(x, R, L):
        nb_, b = R.shape[0], R.shape[-1]
        B = x.shape[:-1]
        n = nb_ * b
        z = torch.einsum("...ji,jai->...ja", x.reshape(*B, nb_, b), R)
        w = z.reshape(*B, n).reshape(*B, b, nb_).transpose(-1, -2)
        y = torch.einsum("...vu,vcu->...vc", w, L)
        return y.transpose(-1, -2).reshape(*B, n)

    class GS(torch.nn.Module):  # reference MonarchOrthogonal: zero init, Cayley at every call
        def __init__(self, n):
            super().__init__()
            self.L = torch.nn.Parameter(torch.zeros(nb, n // nb, n // nb))
            self.R = torch.nn.Parameter(torch.zeros(nb, n // nb, n // nb))

        def forward(self, x):
            return butterfly(x, cayley(self.R), cayley(self.L))

    class Proc(torch.nn.Module):  # reference MOFTCrossAttnProcessor (docs/math.md §2)
        def __init__(self, h, ctx):
            super().__init__()
            self.q, self.k, self.v, self.o = GS(h), GS(ctx), GS(ctx), GS(h)
            self.qs, self.ks, self.vs, self.os = (
                torch.nn.Parameter(torch.ones(h)) for _ in range(4)
            )

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            *a,
            **k,
        ):
            x = hidden_states
            e = x if encoder_hidden_states is None else encoder_hidden_states
            q = self.qs * attn.to_q(self.q(x))
            kk = self.ks * attn.to_k(self.k(e))
            v = self.vs * attn.to_v(self.v(e))
            q, kk, v = (attn.head_to_batch_dim(t) for t in (q, kk, v))
            p = attn.get_attention_scores(q, kk, None)
            o = attn.batch_to_head_dim(torch.bmm(p, v))
            lin = attn.to_out[0]
            out = self.os * torch.nn.functional.linear(self.o(o), lin.weight) + lin.bias
            return attn.to_out[1](out)

    procs = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        h = attn.to_q.in_features
        procs[name] = Proc(h, attn.to_k.in_features)
    params = [p for proc in procs.values() for p in proc.parameters()]
    unet.set_attn_processor(dict(procs))  # diffusers pops entries from the dict it is given
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    x = {k: torch.tensor(v) for k, v in _inputs(cfg).items()}
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(1)

    def run():
        t = torch.randint(0, 1000, (1,), generator=gen)
        noise = torch.randn(x["latents"].shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x["latents"] + (1 - a).sqrt() * noise
        pred = unet(
            xt,
            t,
            x["prompt_embeds"],
            added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
        ).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return run, int(sum(np.prod(p.shape) for p in params))


def worker(config: str, impl: str, steps: int) -> dict:
    cfg, nb = CONFIGS[config]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    run, n_params = _torch_step(cfg, nb) if impl == "torch-ref" else _jax_step(cfg, nb, impl)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_loss = run()
    first_s = time.perf_counter() - t0  # JAX: trace + compile + one step
    run()  # second warm-up step (allocator, caches)
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(
        config=config,
        impl=impl,
        nb=nb,
        adapter_params=n_params,
        setup_s=setup_s,
        first_step_s=first_s,
        step_median_s=statistics.median(wall),
        step_min_s=min(wall),
        cpu_median_s=statistics.median(cpu),
        steps_per_s=1.0 / statistics.median(wall),
        first_loss=first_loss,
        last_loss=loss,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_before_mb=rss0,
        load1=os.getloadavg()[0],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=list(CONFIGS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps after two warm-up steps")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core host, OpenMP barriers "
        "under contention made 2-thread torch steps 5-10x slower and growing)",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return 0

    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        TRAIN_STEP_TORCH_THREADS=str(args.torch_threads),
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    rows = []
    for config in args.configs:
        for impl in args.impls:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", config, impl, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
                timeout=args.timeout,
            )
            if proc.returncode != 0:
                print(f"{config}/{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(
                json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            )
            r = rows[-1]
            print(
                f"  {config:6s} {impl:12s} {r['steps_per_s']:7.2f} steps/s  first step {r['first_step_s']:.1f} s  "
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    by = {(r["config"], r["impl"]): r for r in rows}
    for r in rows:
        ref = by.get((r["config"], "torch-ref"))
        r["speedup_vs_torch"] = (ref["step_median_s"] / r["step_median_s"]) if ref else None
    import platform

    try:
        import jax
        import torch

        versions = dict(
            jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads()
        )
    except ImportError:
        versions = {}
    payload = dict(
        benchmark="train_step",
        steps=args.steps,
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        date_utc=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        load1_end=os.getloadavg()[0],
        torch_threads_used=args.torch_threads,
        note="CPU shared with other jobs: compare ratios within one run; cpu_median_s is process CPU time",
        **versions,
        results=rows,
    )
    out = root / "benchmarks" / "results" / "train_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    head = "| config | impl | steps/s | median step | CPU/step | first step (compile) | peak RSS | x torch |"
    print(head)
    print("|" + "---|" * 8)
    for r in rows:
        sp = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
        print(
            f"| {r['config']} | {r['impl']} | {r['steps_per_s']:.2f} | {r['step_median_s'] * 1e3:.1f} ms | "
            f"{r['cpu_median_s'] * 1e3:.1f} ms | {r['first_step_s']:.1f} s | {r['peak_rss_mb']:.0f} MB | {sp} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
