"""Data-parallel training on four forced CPU devices, against the same run on one device.

Run as a script by ``test_train_sharded.py`` with the tiny UNet folder and a scratch folder as its
arguments (the device count is fixed when JAX starts, so it needs a process of its own); prints
one JSON object of findings.
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

from orthofuse_jax import configure_cpu_threads  # noqa: E402
from orthofuse_jax.models import load_unet  # noqa: E402
from orthofuse_jax.models.checkpoint import (  # noqa: E402
    load_checkpoint,
    save_checkpoint,
    train_fingerprint,
)
from orthofuse_jax.models.configs import TINY_SDXL_UNET, pooled_dim  # noqa: E402
from orthofuse_jax.models.mesh import make_mesh, replicate, shard_batch  # noqa: E402
from orthofuse_jax.models.train import (  # noqa: E402
    TrainConfig,
    init_train_state,
    make_loss,
    make_train_step,
    run_training,
)
from orthofuse_jax.models.train_data import LatentData  # noqa: E402

configure_cpu_threads()


def data() -> list[LatentData]:
    """Concept latents with a posterior std (random draws) and two prompts' worth of tokens."""
    rng = np.random.default_rng(3)
    return [
        LatentData(
            rng.standard_normal((6, 4, 8, 8)).astype(np.float32),
            (0.1 + 0.1 * rng.random((6, 4, 8, 8))).astype(np.float32),
            rng.standard_normal((5, TINY_SDXL_UNET["cross_attention_dim"])),
            rng.standard_normal(pooled_dim(TINY_SDXL_UNET)),
            np.array([[64, 64]] * 6),
            (8, 8),
        )
    ]


def largest_gap(a, b) -> float:
    """The largest absolute difference between two trees' leaves."""
    gaps = jax.tree_util.tree_map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
        a,
        b,
    )
    return max(jax.tree_util.tree_leaves(gaps))


def largest_value(tree) -> float:
    """The largest absolute Cayley parameter: shows the steps moved the adapter."""
    return max(float(np.max(np.abs(np.asarray(s.L)))) for s in tree.stacks.values())


def cli_run(unet_dir: str, out: str, d: LatentData, one) -> dict:
    """``orthofuse-jax train --mesh data=4`` on ``d`` written to files, against the 1-device run ``one``."""
    from orthofuse_jax.cli import main as cli
    from orthofuse_jax.fusion.adapter import to_layers
    from orthofuse_jax.fusion.io import load_adapter

    lat, emb = os.path.join(out, "lat.npz"), os.path.join(out, "emb.npz")
    np.savez(lat, latents=d.latents, latents_std=d.std, original_sizes=d.original_sizes)
    np.savez(emb, prompt_embeds=d.prompt_embeds, pooled=d.pooled)
    ck, log = os.path.join(out, "dp.safetensors"), os.path.join(out, "log.json")
    argv = ["train", "--model", os.path.dirname(unet_dir), "--latents", lat, "--embeddings", emb]
    argv += ["--nblocks", "4", "--steps", "2", "--batch-size", "4", "--lr", "3e-3"]
    rc = cli(argv + ["--mesh", "data=4", "--no-progress", "--log-json", log, "-o", ck])
    got, want = to_layers(load_adapter(ck)), to_layers(one.adapter)
    with open(log) as f:
        losses = json.load(f)["losses"]
    return {
        "rc": rc,
        "adapter": largest_gap(got, want),
        "losses": float(np.max(np.abs(np.asarray(losses) - one.losses))),
    }


def main() -> None:
    unet, params, config = load_unet(sys.argv[1])
    found: dict = {"devices": jax.device_count()}
    ds = data()
    cfg = TrainConfig(steps=2, nblocks=4, batch_size=4, learning_rate=3e-3, progress=False)
    one = run_training(unet, params, config, ds, cfg)
    # data=4 with a checkpoint after step 1; that checkpoint resumed on data=2 (another mesh)
    fp = train_fingerprint(cfg, ds)
    half = os.path.join(sys.argv[2], "half.safetensors")
    four = run_training(
        unet,
        params,
        config,
        ds,
        replace(cfg, mesh=make_mesh({"data": 4}), checkpoint_every=1),
        on_checkpoint=lambda st: save_checkpoint(half, st, fp),
    )
    two = replace(cfg, mesh=make_mesh({"data": 2}))
    resumed = run_training(
        unet, params, config, ds, two, state=load_checkpoint(half, config, two, fp)
    )
    for name, run in (("data=4", four), ("resume data=4 -> data=2", resumed)):
        found[name] = {
            "adapter": largest_gap(run.adapter, one.adapter),
            "opt_state": largest_gap(run.opt_state, one.opt_state),
            "losses": float(np.max(np.abs(run.losses - one.losses))),
            "key": bool(np.array_equal(run.key, one.key)),
            "data_rng": run.data_rng == one.data_rng,
        }
    found["moved"] = largest_value(one.adapter)
    found["losses"] = one.losses.tolist()

    # The step itself: the batch split four ways, the adapter replicated, gradients all-reduced.
    mesh = make_mesh({"data": 4})
    state = init_train_state(config, cfg)
    loss_fn = make_loss(unet, params, state.adapter, config=config)
    step = make_train_step(loss_fn, cfg.optimizer(), mesh=mesh, donate=False)
    batch = shard_batch(ds[0].sample(np.random.default_rng(0), 4), mesh)
    args = replicate((state.adapter, state.opt_state, params), mesh)
    key = replicate(np.asarray(state.key), mesh)
    out = step(*args, batch, key)
    found["batch_specs"] = sorted(
        {str(tuple(x.sharding.spec)) for x in jax.tree_util.tree_leaves(batch)}
    )
    found["batch_shard_rows"] = sorted(
        {s.data.shape[0] for x in jax.tree_util.tree_leaves(batch) for s in x.addressable_shards}
    )
    found["out_replicated"] = all(
        x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(out)
    )
    found["all_reduce"] = "all-reduce" in step.lower(*args, batch, key).compile().as_text()

    found["cli"] = cli_run(sys.argv[1], sys.argv[2], ds[0], one)

    try:
        run_training(unet, params, config, ds, replace(cfg, batch_size=6, mesh=mesh))
        found["indivisible"] = None
    except ValueError as e:
        found["indivisible"] = str(e)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
