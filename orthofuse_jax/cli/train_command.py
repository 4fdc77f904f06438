"""``orthofuse-jax train``: train a GS adapter on a frozen local SDXL UNet (docs/math.md §6).

Importing this module imports neither flax nor diffusers; the run function does.

Modes (what decides the mode is which data is given):

* concept: ``--images DIR`` (every image, centre crop + resize) or ``--latents FILE.npz``
* style:   ``--style-image FILE`` (random crops; caption from ``data.json`` next to it or
  ``--caption-file``, recorded in the checkpoint metadata) or ``--style-latents FILE.npz``
* joint (paper Table 1 baseline): a concept source and a style source together; batches alternate
  between the two (``--style-fraction`` sets the share of style steps, default 0.5).

Text: prompts are encoded by the model folder's two CLIP text encoders (``text_encoder*/``,
``tokenizer*/``; Flax CLIP from transformers 4.57, as ``generate --prompt``): ``--prompt`` for the
concept, ``--style-prompt`` or the style caption for the style. Or pass precomputed embeddings
instead (``orthofuse-jax encode-prompt`` writes them): ``--embeddings`` (for the concept, or for the
style in style mode) and ``--style-embeddings`` (joint mode), ``.npz`` with ``prompt_embeds
[77, 2048]`` and ``pooled [1280]``; then the prompt text is only metadata. Images need
``--model/vae`` (diffusers layout) to be encoded
once; ``--save-latents`` keeps the encodings for the next run. Latent ``.npz``: ``latents
[N, 4, h, w]`` (x_0 times the VAE scaling factor), optional ``latents_std``, ``original_sizes``.

Output: ``-o ADAPTER.safetensors`` in the reference checkpoint format (docs/math.md §5; readable by the
reference's ``load_attn_procs`` and by ``fuse``), written atomically; ``--checkpoint-every N``
also writes ``ADAPTER-step{N}.safetensors`` (reference: every 200 steps). Beside every adapter
file goes ``ADAPTER[-step{N}].opt.npz``: the AdamW state, step, random-number state and losses
that resuming needs (about twice the adapter's size; the adapter file stays in the reference
format). Defaults follow the reference recipe: nb 32, 1000 steps, batch 1, 1024 px, AdamW lr 1e-4,
weight decay 1e-4, fp32.

Resuming: ``--resume ADAPTER-step200.safetensors`` (its ``.opt.npz`` must lie beside it) continues
that run; ``--steps`` stays the total, so ``--steps 1000`` runs steps 201..1000, and the result is
the same computation as the uninterrupted run (bit for bit on CPU). Give the same data and
settings (--nblocks, --lr, --weight-decay, --max-grad-norm, --batch-size, --seed, --no-scales,
--bf16, --style-fraction, the model's scheduler): a difference is an error (exit 2) that names the
setting, as are a missing or damaged .opt.npz, a checkpoint at or past --steps and shapes that do
not fit the model and --nblocks. --steps, --checkpoint-every, --apply, -o and --log-json may
change. The input checkpoint is never overwritten (-o must be another path); later checkpoints keep
the uninterrupted run's names and steps and get their own .opt.npz, so a resumed run can be
resumed again. The --log-json losses cover all steps, those before the checkpoint included.

Several devices: ``--mesh data=D`` trains data parallel (each --batch-size batch split over D
devices, the model, adapter and optimizer state replicated; the same steps as on one device, to
float32 rounding); a run may resume on another mesh. Several hosts run one process each with the
same arguments and ``--distributed`` (implied by JAX_COORDINATOR_ADDRESS; JAX_NUM_PROCESSES and
JAX_PROCESS_ID are passed on when set); process 0 writes the files. See docs/design.md.
"""

from __future__ import annotations

import argparse

from ._common import add_model_option

__all__ = ["register", "run_train"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train a GS orthogonal adapter (concept, style or joint) on a local SDXL UNet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p, "unet/, vae/ for images, scheduler/")
    p.add_argument(
        "-o", "--output", required=True, help="output adapter .safetensors (reference format)"
    )
    src = p.add_argument_group("data")
    src.add_argument("--images", default=None, help="concept images folder (searched recursively)")
    src.add_argument("--latents", default=None, help="concept latents .npz instead of --images")
    src.add_argument("--style-image", default=None, help="single style image (random crops)")
    src.add_argument(
        "--style-latents", default=None, help="style latents .npz instead of --style-image"
    )
    src.add_argument(
        "--prompt",
        default=None,
        help='concept prompt, e.g. "a photo of <sks> dog" (encoded by the text encoders)',
    )
    src.add_argument(
        "--style-prompt", default=None, help="style prompt text (default: from the caption file)"
    )
    src.add_argument(
        "--caption-file",
        default=None,
        help="style captions json (default: data.json next to the image)",
    )
    src.add_argument(
        "--style-suffix", default=" in <style> style", help="appended to the caption (reference)"
    )
    src.add_argument(
        "--embeddings",
        default=None,
        help=".npz text embeddings of the concept prompt (style prompt in style mode)",
    )
    src.add_argument(
        "--style-embeddings",
        default=None,
        help=".npz text embeddings of the style prompt (joint mode)",
    )
    src.add_argument(
        "--style-fraction",
        type=float,
        default=0.5,
        help="share of style steps in joint mode (default 0.5)",
    )
    src.add_argument(
        "--resolution", type=int, default=1024, help="training resolution in pixels (default 1024)"
    )
    src.add_argument(
        "--save-latents",
        default=None,
        metavar="PREFIX",
        help="write the VAE encodings to PREFIX-concept.npz / PREFIX-style.npz for reuse",
    )
    opt = p.add_argument_group("optimisation (reference defaults)")
    opt.add_argument("--nblocks", type=int, default=32, help="GS blocks per layer (default 32)")
    opt.add_argument("--steps", type=int, default=1000, help="optimisation steps (default 1000)")
    opt.add_argument("--batch-size", type=int, default=1, help="default 1")
    opt.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    opt.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="AdamW decoupled weight decay (default 1e-4)",
    )
    opt.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the global gradient norm (default: off, as the reference)",
    )
    opt.add_argument(
        "--no-scales",
        action="store_true",
        help="do not train per-channel scales (moft_scale=False)",
    )
    opt.add_argument(
        "--bf16",
        action="store_true",
        help="run the UNet in bfloat16 (adapter and loss stay float32)",
    )
    opt.add_argument("--seed", type=int, default=8, help="default 8 (reference)")
    opt.add_argument(
        "--apply",
        choices=("fold", "onthefly"),
        default="fold",
        help="fold the adapter into the kernels once per step (default) or rotate every "
        "projection input as the reference does (same loss; often faster for few tokens)",
    )
    dev = p.add_argument_group("devices")
    dev.add_argument(
        "--mesh",
        default=None,
        metavar="data=D",
        help="train data parallel on D devices: each batch split over them, the model, adapter "
        "and optimizer state replicated (--batch-size, the global batch, divisible by D; "
        "default: one device)",
    )
    dev.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first: one process per host of a multi-host run "
        "(implied when JAX_COORDINATOR_ADDRESS is set); only process 0 writes files",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save every N steps (0: off)"
    )
    out.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue the run that wrote CKPT.safetensors (and CKPT.opt.npz beside it) up to --steps",
    )
    out.add_argument(
        "--log-json", default=None, help="write per-step losses and settings to this JSON file"
    )
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_train)
    return p


def _checkpoint_path(output: str, step: int) -> str:
    import os

    stem, ext = os.path.splitext(output)
    return f"{stem}-step{step}{ext or '.safetensors'}"


def _dataset(args, which: str, vae_cache: dict):
    """LatentData of the concept or style source in ``args`` (None when not given)."""
    import os

    import numpy as np

    from ..models import train_data as td

    if which == "concept":
        images, latents = args.images, args.latents
        emb_path = args.embeddings
        prompt = args.prompt
    else:
        images, latents = args.style_image, args.style_latents
        joint = bool(args.images or args.latents)
        emb_path = args.style_embeddings if joint else (args.style_embeddings or args.embeddings)
        prompt = args.style_prompt
        if prompt is None and images:
            prompt = td.style_caption(images, args.caption_file, args.style_suffix)
    if images is None and latents is None:
        return None, prompt
    if images is not None and latents is not None:
        raise ValueError(f"give either images or latents for the {which}, not both")
    what = (
        "--embeddings"
        if which == "concept" or not (args.images or args.latents)
        else "--style-embeddings"
    )
    if emb_path is None:
        if prompt is None:
            flag = "--prompt" if which == "concept" else "--style-prompt (or a caption file)"
            raise td.EmbeddingsRequiredError(
                f"{which}: no prompt: give {flag}, encoded by the model's text encoders, or {what} FILE.npz "
                "with prompt_embeds [77, 2048] and pooled [1280]"
            )
        if "text" not in vae_cache:
            from ..models.text import load_text_encoders

            vae_cache["text"] = load_text_encoders(args.model)
        from ..models.text import encode_prompt

        pe, pooled = (a[0] for a in encode_prompt(vae_cache["text"], prompt))
    else:
        pe, pooled = td.load_prompt_embeddings(emb_path, prompt or "")
    res = args.resolution
    if res % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {res}")
    if latents is not None:
        data = td.load_latents(latents)
        lat = data["latents"]
        full = (int(lat.shape[2]), int(lat.shape[3]))
        crop = (res // 8, res // 8) if which == "style" else full
        if which == "style" and (crop[0] > full[0] or crop[1] > full[1]):
            crop = full
        sizes = data.get(
            "original_sizes", np.tile([[lat.shape[2] * 8, lat.shape[3] * 8]], (lat.shape[0], 1))
        )
        return td.LatentData(
            lat,
            data.get("latents_std"),
            pe,
            pooled,
            sizes,
            crop,
            random_crop=which == "style",
            name=latents,
        ), prompt
    if "vae" not in vae_cache:
        from ..models.weights import load_vae

        vae, vae_params, vae_cfg = load_vae(args.model)
        vae_cache["vae"] = (vae, vae_params, 2 ** (len(vae_cfg["block_out_channels"]) - 1))
    vae, vae_params, f = vae_cache["vae"]
    paths = td.list_images(images) if which == "concept" else [images]
    if which == "style" and not os.path.isfile(images):
        raise FileNotFoundError(f"style image {images!r} does not exist")
    prep = td.preprocess_concept if which == "concept" else td.preprocess_style
    pix, sizes = zip(*(prep(p, res) for p in paths))
    means, stds = td.encode_images(vae, vae_params, pix)
    lat, std = np.stack(means), np.stack(stds)
    if args.save_latents:
        td.save_latents(f"{args.save_latents}-{which}.npz", lat, std, np.asarray(sizes))
    return td.LatentData(
        lat,
        std,
        pe,
        pooled,
        np.asarray(sizes),
        (res // f, res // f),
        random_crop=which == "style",
        vae_scale_factor=f,
        name=images,
    ), prompt


# What a fingerprint entry (models.checkpoint.train_fingerprint) is called on the command line.
_SETTING_FLAGS = {
    "nblocks": "--nblocks",
    "learning_rate": "--lr",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "train_scales": "scales (--no-scales)",
    "bf16": "--bf16",
    "mix": "data mix (--style-fraction)",
    "datasets": "number of data sources",
    "noise_schedule": "noise schedule (the model's scheduler config)",
    "b1": "AdamW b1",
    "b2": "AdamW b2",
    "eps": "AdamW eps",
}


def _process_env() -> dict[str, int]:
    """``num_processes`` / ``process_id`` from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set
    (``jax.distributed.initialize`` reads only the coordinator address from the environment)."""
    import os

    found = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        text = os.environ.get(var)
        if text is None:
            continue
        if not text.strip().isdigit():
            raise ValueError(f"environment variable {var}={text!r} is not a non-negative integer")
        found[arg] = int(text)
    return found


def _training_mesh(args):
    """The ``--mesh`` of ``args`` (None: one device), after ``--distributed`` start-up; checks
    that its data size divides ``--batch-size`` before any data or weights are loaded."""
    import os

    import jax

    if args.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(**_process_env())
    if args.mesh is None:
        return None
    from ..models.mesh import make_mesh, parse_mesh
    from ..models.train import check_data_parallel

    axes = parse_mesh(args.mesh)
    if "data" not in axes:
        raise ValueError(
            f"--mesh {args.mesh!r}: training splits batches over a 'data' axis (data=D)"
        )
    if args.batch_size % axes["data"]:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by --mesh data={axes['data']} "
            "(every device takes batch-size / D items)"
        )
    mesh = make_mesh(axes)
    check_data_parallel(args.batch_size, mesh)
    return mesh


def run_train(args) -> int:
    """Run ``train`` for parsed ``args``; returns the exit status (2 on a bad input)."""
    import json
    import os
    import time

    if args.steps < 0 or args.batch_size < 1 or args.nblocks < 1:
        raise ValueError("--steps must be >= 0, --batch-size and --nblocks >= 1")
    if args.checkpoint_every < 0:
        raise ValueError("--checkpoint-every must be >= 0")
    if not 0.0 < args.style_fraction < 1.0:
        raise ValueError(f"--style-fraction must be in (0, 1), got {args.style_fraction}")
    mesh = _training_mesh(args)
    from ..fusion.io import check_output_path
    from ..models.checkpoint import train_state_path

    inputs = [
        x
        for x in (
            args.latents,
            args.style_latents,
            args.style_image,
            args.embeddings,
            args.style_embeddings,
        )
        if x
    ]
    if args.resume:
        inputs += [args.resume, train_state_path(args.resume)]
    check_output_path(args.output, inputs)
    check_output_path(train_state_path(args.output), inputs)
    vae_cache: dict = {}
    concept, concept_prompt = _dataset(args, "concept", vae_cache)
    style, style_prompt = _dataset(args, "style", vae_cache)
    vae_cache.clear()  # free the text encoders and the VAE before the UNet is loaded
    datasets = [d for d in (concept, style) if d is not None]
    if not datasets:
        raise ValueError(
            "no training data: give --images/--latents (concept) and/or --style-image/--style-latents"
        )
    mode = "joint" if len(datasets) == 2 else ("concept" if concept is not None else "style")
    mix = [1 - args.style_fraction, args.style_fraction] if mode == "joint" else None

    import jax.numpy as jnp

    from ..models.checkpoint import load_checkpoint, save_checkpoint, train_fingerprint
    from ..models.train import (
        TrainConfig,
        init_adapter,
        init_train_state,
        run_training,
        scheduler_config,
    )
    from ..models.weights import load_unet

    unet, params, config = load_unet(args.model, dtype=jnp.bfloat16 if args.bf16 else None)
    from ..models.generate import check_embeddings

    for d in datasets:
        check_embeddings(
            {"prompt_embeds": d.prompt_embeds, "pooled": d.pooled},
            config,
            source=f"text embeddings of {d.name}",
        )
    adapter0 = init_adapter(config, args.nblocks, scales=not args.no_scales)
    cfg = TrainConfig(
        steps=args.steps,
        nblocks=args.nblocks,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        seed=args.seed,
        train_scales=not args.no_scales,
        bf16=args.bf16,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        noise_schedule=scheduler_config(args.model),
        apply=args.apply,
        mesh=mesh,
    )
    fingerprint = train_fingerprint(cfg, datasets, mix)
    if args.resume:
        sources = {
            "concept": "concept data (--images/--latents)",
            "style": "style data (--style-image/--style-latents)",
        }
        kinds = ["concept", "style"] if mode == "joint" else [mode]
        labels = {**_SETTING_FLAGS, **{f"data[{i}]": sources[k] for i, k in enumerate(kinds)}}
        state0 = load_checkpoint(args.resume, config, cfg, fingerprint, labels=labels)
        if state0.step >= args.steps:
            raise ValueError(
                f"{args.resume}: the checkpoint is at step {state0.step}, not before --steps {args.steps} "
                "(--steps is the total step count; raise it to train further)"
            )
    else:
        state0 = init_train_state(config, cfg, adapter=adapter0)
    every = args.checkpoint_every
    for step in (k for k in range(state0.step + 1, args.steps) if every and k % every == 0):
        path = _checkpoint_path(
            args.output, step
        )  # every later checkpoint, refused before training
        for p in (path, train_state_path(path)):
            try:
                check_output_path(p, inputs)
            except ValueError as e:
                raise ValueError(
                    f"{e} (the step-{step} checkpoint of this run; choose another -o)"
                ) from None

    meta = {
        "orthofuse_jax": "train",
        "mode": mode,
        "nblocks": str(args.nblocks),
        "lr": repr(args.lr),
        "weight_decay": repr(args.weight_decay),
        "max_grad_norm": repr(args.max_grad_norm),
        "bf16": str(bool(args.bf16)).lower(),
        "seed": str(args.seed),
        "apply": args.apply,
    }
    if concept_prompt:
        meta["prompt"] = concept_prompt
    if style_prompt:
        meta["style_prompt"] = style_prompt
    if args.resume:
        meta["resumed_from"] = os.path.basename(os.fspath(args.resume))

    def save(path, state):
        if not writer:
            return
        save_checkpoint(
            path, state, fingerprint, metadata={**meta, "step": str(state.step)}, inputs=inputs
        )

    def on_checkpoint(state):
        path = _checkpoint_path(args.output, state.step)
        save(path, state)
        if args.no_progress:
            print(f"checkpoint {path}")

    import jax

    writer = jax.process_index() == 0
    start = state0.step
    t0 = time.perf_counter()
    final = run_training(
        unet, params, config, datasets, cfg, mix=mix, state=state0, on_checkpoint=on_checkpoint
    )
    elapsed = time.perf_counter() - t0
    save(args.output, final)
    losses = final.losses
    if args.log_json and writer:
        from ..fusion.io import atomic_write_bytes

        log = {
            "mode": mode,
            "steps": args.steps,
            "start_step": start,
            "seconds": elapsed,
            "losses": losses.tolist(),
            "metadata": meta,
        }
        atomic_write_bytes(args.log_json, json.dumps(log).encode())
    new = losses[start:]
    n = len(new)
    if n:
        k = max(1, n // 10)
        since = f" (resumed at step {start})" if start else ""
        print(
            f"{mode}: {n} steps in {elapsed:.1f} s{since}; loss {new[:k].mean():.4f} (first {k}) -> "
            f"{new[-k:].mean():.4f} (last {k})"
        )
    print(f"wrote {os.fspath(args.output)}")
    return 0
