"""How the SDXL programs scale over devices, read from the compiled programs themselves.

    python -m benchmarks.sharded_programs [--devices 1,4,8]

For each device count D (forced CPU devices, one process each: the count is fixed when JAX
starts) the SDXL base denoise step of ``orthofuse-jax generate`` (1024 px, guidance on, one image
per device, params replicated, images split over ``data``) is lowered from abstract shapes and
compiled, with no weights in memory. From the compiled program: XLA's cost analysis (flops per
device), its memory analysis (arguments, outputs and temporaries per device), and the
cross-device operations in its HLO with the bytes they move. Writes
``benchmarks/results/sharded_programs.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

from .common import machine, table, write_json

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of cross-device operation produces in one run of an HLO module (its outputs'
    sizes, per device)."""
    moved = {}
    for line in hlo.splitlines():
        for kind in COLLECTIVES:
            m = re.search(rf"= \(?([a-z0-9]+)\[([0-9,]*)\][^ ]* {kind}(-start)?\(", line)
            if m:
                dims = [int(d) for d in m.group(2).split(",") if d]
                size = _BYTES.get(m.group(1), 4)
                for d in dims:
                    size *= d
                moved[kind] = moved.get(kind, 0) + size
    return moved


def measure(devices: int) -> dict:
    """The generation step's analyses on ``devices`` forced CPU devices (run in its own process)."""
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    from diffusers import FlaxUNet2DConditionModel

    from orthofuse_jax.models import configs
    from orthofuse_jax.models.generate import make_step
    from orthofuse_jax.models.mesh import data_mesh

    cfg = dict(configs.SDXL_BASE_UNET)
    unet = FlaxUNet2DConditionModel.from_config(cfg)
    params = jax.eval_shape(lambda: unet.init_weights(jax.random.PRNGKey(0)))
    rows = 2 * devices  # one image per device, guidance: two UNet rows each
    f32 = jnp.float32
    shape = jax.ShapeDtypeStruct
    scalar = shape((), f32)
    step = make_step(unet, 5.0, data_mesh(f"data={devices}"))
    compiled = step.lower(
        params,
        shape((devices, 4, 128, 128), f32),
        scalar,
        scalar,
        scalar,
        shape((rows, 77, cfg["cross_attention_dim"]), f32),
        shape((rows, 1280), f32),
        shape((rows, 6), f32),
    ).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "devices": devices,
        "images": devices,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "collective_bytes": collective_bytes(compiled.as_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,4,8", help="comma list of device counts")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    for d in (int(x) for x in args.devices.split(",")):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.sharded_programs", "--one", str(d)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    gib = 2**30
    header = [
        "devices",
        "images",
        "TFLOP / device",
        "params + inputs GiB / device",
        "temporaries GiB / device",
        "cross-device bytes",
    ]
    body = [
        [
            r["devices"],
            r["images"],
            f"{r['flops_per_device'] / 1e12:.2f}",
            f"{r['argument_bytes'] / gib:.2f}",
            f"{r['temp_bytes'] / gib:.2f}",
            sum(r["collective_bytes"].values()),
        ]
        for r in rows
    ]
    print(table(body, header))
    write_json(
        "sharded_programs",
        {
            "machine": machine(),
            "command": "python -m benchmarks.sharded_programs --devices " + args.devices,
            "generate_step": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
