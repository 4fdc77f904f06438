"""``orthofuse-jax fuse``, ``sweep``, ``demo`` and ``inspect``: the merge commands.

Default merge = the reference's ``moft_merge`` preset: exact block geodesic, ``curve_over_id``
spectra restoration (``--method geodesic --restore cayley``), ``--t 0.6``. t = 0 is the concept
(first) adapter, t = 1 the style (second). Importing this module imports no JAX; the commands do.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

from ._common import PROG, CLIError

__all__ = ["cmd_demo", "cmd_fuse", "cmd_inspect", "cmd_sweep", "parse_ts", "register"]


# ----------------------------------------------------------------------------------------------
# helpers


def parse_ts(text: str) -> list[float]:
    """``start:stop:count`` (inclusive linspace) or a comma list ``0,0.5,1``."""
    try:
        if ":" in text:
            first, last, count = text.split(":")
            n = int(count)
            if n < 1:
                raise ValueError
            if n == 1:
                return [float(first)]
            a, b = float(first), float(last)
            return [a + (b - a) * i / (n - 1) for i in range(n)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(
            f"--ts {text!r}: expected start:stop:count (e.g. 0:1:11) or a comma list"
        ) from None


def _check_t(ts, extrapolate: bool) -> None:
    for t in ts:
        if not math.isfinite(t):
            raise CLIError(f"t={t} is not a finite number")
        if not extrapolate and not 0.0 <= t <= 1.0:
            raise CLIError(
                f"t={t:g} is outside [0, 1] (0 = concept, 1 = style); pass --extrapolate to extrapolate"
            )


def _prefetch(args) -> None:
    """Read both input files into host arrays in two threads (numpy alone: ``pread`` and the checks
    release the GIL), started before JAX is imported; :func:`_load_pair` collects them."""
    from concurrent.futures import ThreadPoolExecutor

    from .._safetensors import read_adapter_file

    pool = ThreadPoolExecutor(2)
    args.prefetched = {
        path: pool.submit(read_adapter_file, path) for path in (args.concept, args.style)
    }
    pool.shutdown(wait=False)


def _load_pair(args):
    from ..fusion.io import adapter_from_arrays, check_pair, load_adapter

    if not hasattr(args, "prefetched"):
        _prefetch(args)

    def load(path):
        arrays = args.prefetched[path].result()
        return (
            load_adapter(path) if arrays is None else adapter_from_arrays(arrays)
        )  # None: PEFT OFT

    concept, style = load(args.concept), load(args.style)
    del args.prefetched
    check_pair([concept, style], [args.concept, args.style])
    if args.float64:
        concept, style = concept.astype("float64"), style.astype("float64")
    return concept, style


def _merge_kwargs(args) -> dict:
    return dict(method=args.method, restore=args.restore, alpha=args.alpha, scales=args.scales)


def _enable_x64(args) -> None:
    if getattr(args, "float64", False):
        import jax

        jax.config.update("jax_enable_x64", True)


# ----------------------------------------------------------------------------------------------
# commands


def _input_format(path) -> tuple[str, str]:
    """``(format, its family or "")`` of an input, from its header: the PEFT version family, or
    LyCORIS ``diag-oft`` against kohya OFT."""
    from ..fusion.io import adapter_format, adapter_keys
    from ..fusion.lycoris import lycoris_format
    from ..fusion.peft import peft_format

    fmt = adapter_format(path)
    family = {"peft": peft_format, "lycoris": lycoris_format}.get(fmt)
    return fmt, family(adapter_keys(path)) if family else ""


def _peft_problem(args, fmt: str, family: str, adapters) -> str | None:
    """Why the fused result cannot be a PEFT >= 0.16 OFT adapter (``None`` when it can)."""
    from ..fusion.peft import check_block_diagonal

    if fmt == "lycoris":
        return (
            f"{args.concept}: a LyCORIS/kohya OFT adapter rotates the layer's output features, "
            "PEFT >= 0.16 its input features; write --to lycoris"
        )
    if fmt == "peft" and family == "<=v0.13":
        return (
            f"{args.concept}: a PEFT <= 0.13 OFT adapter rotates the layer's output features, "
            "PEFT >= 0.16 its input features; write --to reference"
        )
    try:
        for adapter, path in zip(adapters, (args.concept, args.style)):
            check_block_diagonal(adapter, str(path))
    except ValueError as e:
        return str(e)
    return None


def cmd_fuse(args, *, quiet: bool = False) -> int:
    from ..fusion.io import check_output_folder, check_output_path, save_merged
    from ..fusion.lycoris import KOHYA_OFT, save_lycoris_oft
    from ..fusion.maps import orthogonality_error, restoration_factor
    from ..fusion.merge import merge
    from ..fusion.peft import CONFIG_NAME, WEIGHTS_NAME, check_unit_scales, save_peft_oft

    del quiet  # one call: nothing to report progress on
    _check_t([args.t], args.extrapolate)
    inputs = [args.concept, args.style]
    try:
        fmt, family = _input_format(args.concept)
    except ValueError:  # an unreadable input: the loader below names the problem
        fmt, family = "reference", ""
    to = getattr(args, "to", None) or fmt
    overwrite = getattr(args, "overwrite", False)
    folder_files = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
    if to == "peft":
        check_output_folder(args.output, inputs, overwrite=overwrite, replaceable=folder_files)
    else:
        check_output_path(args.output, inputs)
    _enable_x64(args)
    concept, style = _load_pair(args)
    note = ""
    if to == "peft":
        problem = _peft_problem(args, fmt, family, (concept, style))
        if problem and getattr(args, "to", None) == "peft":
            raise CLIError(problem)
        if problem:  # the default follows the first input only where it can hold the result
            to, note = "reference", f" (not PEFT OFT: {problem})"
            check_output_path(args.output, inputs)
    t0 = time.perf_counter()
    kw = _merge_kwargs(args)
    # curve_over_id's result Cay(eta Y) is stored as its Cayley parameters eta skew(Y): the merge
    # stops before the restoration, and the file needs no inversion of the restored blocks.
    # A LyCORIS file holds the restored blocks' parameters (its writer inverts the Cayley map).
    eta = (
        0.5 * restoration_factor(args.t, args.alpha)
        if args.restore == "cayley" and to != "lycoris"
        else None
    )
    try:
        merged = merge(
            [concept, style],
            t=args.t,
            extrapolate=args.extrapolate,
            algorithm=args.algorithm,
            **{**kw, "restore": "none" if eta is not None else args.restore},
        )
    except ValueError as e:
        raise CLIError(f"{args.concept} + {args.style}: {e}") from None
    merged = merged.map_stacks(lambda x: x.block_until_ready())
    elapsed = time.perf_counter() - t0
    del concept, style
    meta = {
        "orthofuse_t": repr(float(args.t)),
        "orthofuse_method": args.method,
        "orthofuse_restore": args.restore,
        "orthofuse_alpha": repr(float(args.alpha)),
        "orthofuse_scales": args.scales,
    }
    if to == "peft":
        try:
            check_unit_scales(merged, f"{args.concept} + {args.style}")
        except ValueError as e:
            if getattr(args, "to", None) == "peft":
                raise
            to, note = "reference", f" (not PEFT OFT: {e})"
            check_output_path(args.output, inputs)
    if to != "reference":  # save_merged measures it as it writes; these writers do not
        err = max(float(orthogonality_error(s.R).max()) for s in merged.stacks.values())
    if to == "lycoris":
        save_lycoris_oft(args.output, merged, template=args.concept, inputs=inputs)
        what = "a LyCORIS OFT file" if family != KOHYA_OFT else "a kohya OFT file"
    elif to == "peft":
        save_peft_oft(
            args.output,
            merged,
            base_config=args.concept,
            inputs=inputs,
            overwrite=overwrite,
            restore_eta=eta,
            metadata=meta,
        )
        what = "a PEFT OFT adapter folder"
    else:
        err = save_merged(args.output, merged, metadata=meta, inputs=inputs, restore_eta=eta)
        what = "a reference GS file"
    shapes = "/".join(str(s.b) for s in sorted(merged.stacks.values(), key=lambda s: s.b))
    print(
        f"fused {merged.num_layers} layers (block sizes {shapes}) at t={args.t:g} "
        f"[{args.method}, restore={args.restore}] in {elapsed:.2f} s; "
        f"max orthogonality error {err:.1e}; wrote {args.output}, {what}{note}"
    )
    return 0


def _write_json_atomic(path: Path, obj) -> None:
    from ..fusion.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


_SWEEP_FILES = ("sweep.json", "angles.png", "speed.png", "ambient_distance.png", "summary.png")


def cmd_sweep(args) -> int:
    from ..fusion.stats import sweep_statistics
    from ..plots import write_sweep_plots

    ts = parse_ts(args.ts)
    _check_t(ts, args.extrapolate)
    out = Path(args.plot)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: --plot must be a directory, a file is in the way")
    for inp in (args.concept, args.style):
        if Path(inp).resolve().parent == out.resolve() and Path(inp).name in _SWEEP_FILES:
            raise CLIError(
                f"{out / Path(inp).name}: output path is the input file {inp}; refusing to overwrite an input"
            )
    _enable_x64(args)
    concept, style = _load_pair(args)
    t0 = time.perf_counter()
    kw = _merge_kwargs(args)
    try:
        stats = sweep_statistics(
            concept, style, ts, extrapolate=args.extrapolate, algorithm=args.algorithm, **kw
        )
    except ValueError as e:
        raise CLIError(f"{args.concept} + {args.style}: {e}") from None
    elapsed = time.perf_counter() - t0
    stats["concept"], stats["style"] = str(args.concept), str(args.style)
    stats["seconds"] = elapsed
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "sweep.json", stats)
    pngs = write_sweep_plots(stats, out)
    print(
        f"swept {len(ts)} values of t over {stats['layers']} layers in {elapsed:.2f} s "
        f"[{args.method}, restore={args.restore}]"
    )
    print(
        "     t   speed(before)  speed(after)  ambient-dist(after)  orth-err(after)  max-angle(after)"
    )
    for i, t in enumerate(stats["ts"]):
        print(
            f"  {t:5.2f}  {stats['speed_before'][i]:13.4f}  {stats['speed_after'][i]:12.4f}  "
            f"{stats['ambient_distance_after'][i]:19.4f}  {stats['orthogonality_error_after'][i]:15.1e}  "
            f"{stats['max_angle_after'][i]:16.3f}"
        )
    print(f"geodesic distance d(concept, style) = {stats['geodesic_distance']:.4f}")
    print(f"wrote {out / 'sweep.json'}")
    for p in pngs:
        print(f"wrote {p}")
    return 0


def cmd_demo(args) -> int:
    from ..fusion.demo import write_demo_pair

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="orthofuse-demo-"))
    t0 = time.perf_counter()
    concept, style = write_demo_pair(out, full_sdxl=args.full_sdxl)
    print(
        f"wrote demo adapters ({'full SDXL, 560' if args.full_sdxl else 'SDXL-shaped, 16'} layers): {concept}, {style}"
    )
    common = dict(
        concept=concept,
        style=style,
        method="geodesic",
        restore="cayley",
        alpha=2.0,
        scales="concept",
        extrapolate=False,
        float64=False,
        algorithm="auto",
    )
    fuse_args = argparse.Namespace(t=0.6, output=out / "fused.safetensors", **common)
    print(f"$ {PROG} fuse {concept} {style} -o {fuse_args.output} --t 0.6")
    cmd_fuse(fuse_args, quiet=True)
    ts = "0:1:5" if args.full_sdxl else "0:1:11"
    sweep_args = argparse.Namespace(ts=ts, plot=out / "sweep", **common)
    print(f"$ {PROG} sweep {concept} {style} --ts {ts} --plot {sweep_args.plot}")
    cmd_sweep(sweep_args)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs in {out}")
    return 0


def cmd_inspect(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from ..fusion.adapter import to_orthogonal
    from ..fusion.io import load_adapter
    from ..geometry import rotation_angles

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(args.file)
    problems = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    orth = to_orthogonal(adapter)
    fmt, family = _input_format(args.file)
    print(f"{args.file}: {adapter.num_layers} GS layers, {len(adapter.scales)} scale vectors")
    label = {"peft": f" (PEFT OFT {family})", "lycoris": f" ({family})"}.get(fmt, "")
    print(f"  format: {fmt}{label}")
    worst_all = 0.0
    for key in sorted(orth.stacks, key=lambda k: orth.stacks[k].b):
        st = orth.stacks[key]
        th = np.nan_to_num(np.asarray(rotation_angles(jnp.concatenate([st.L, st.R]))), nan=np.pi)
        per_layer = th.reshape(2, len(st.names), -1).max(axis=(0, 2))
        worst = float(per_layer.max())
        worst_all = max(worst_all, worst)
        print(
            f"  {key}: {len(st.names):4d} layers  L,R [{st.nb}, {st.b}, {st.b}]  n={st.nb * st.b}  "
            f"max rotation angle {worst:.3f} rad (mean over layers {per_layer.mean():.3f})"
        )
        for name, a in zip(st.names, per_layer):
            if a > np.pi - 1e-3:
                problems.append(
                    f"layer {name!r}: a block rotates by ~pi (eigenvalue -1): no geodesic merge"
                )
            elif a > np.pi / 2:
                problems.append(
                    f"layer {name!r}: max rotation {a:.2f} rad > pi/2 (curve_over_id saturates there)"
                )
    if adapter.scales:
        sc = np.concatenate([np.asarray(v).ravel() for v in adapter.scales.values()])
        print(f"  scales: min {sc.min():.4f}  max {sc.max():.4f}  mean {sc.mean():.4f}")
    missing = [n for n in adapter.layer_names if n not in adapter.scales]
    if adapter.scales and missing:
        problems.append(f"{len(missing)} layer(s) without a scale vector, e.g. {missing[0]!r}")
    print(f"  max rotation angle overall: {worst_all:.3f} rad")
    print(f"  problems: {len(problems)}" + ("" if problems else " (none)"))
    for p in problems:
        print(f"   - {p}")
    return 0


def _add_merge_options(p) -> None:
    p.add_argument(
        "--method",
        choices=["geodesic", "cayley"],
        default="geodesic",
        help="geodesic: exact block-wise SO(b) geodesic (docs/math.md §3.1); cayley: fast Cayley-space "
        "merge (docs/math.md §3.2). Default: geodesic",
    )
    p.add_argument(
        "--restore",
        choices=["cayley", "exact", "none"],
        default="cayley",
        help="spectra restoration, with f = 1 + 4(alpha-1)t(1-t): cayley = the reference's "
        "curve_over_id, Cay(eta Y) with eta = f/2; exact = exp(f log Y); none. Default: cayley",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=2.0,
        help="phase multiplier f(1/2) of the restoration (default 2, the reference's)",
    )
    p.add_argument(
        "--scales",
        choices=["concept", "geometric", "linear"],
        default="concept",
        help="scale vectors: concept (the reference's behaviour), per-channel weighted geometric "
        "mean, or linear interpolation. Default: concept",
    )
    p.add_argument("--extrapolate", action="store_true", help="allow t outside [0, 1]")
    p.add_argument(
        "--algorithm",
        choices=["auto", "eigh", "matmul"],
        default="auto",
        help="how logs and exponentials of rotations are taken: matmul = products only (eigh for "
        "blocks beyond 2.4 rad; fastest, most of all on GPUs), eigh = the spectral formula; "
        "auto = matmul for a float32 fuse, eigh for sweeps and --float64. Default: auto",
    )
    p.add_argument(
        "--float64", action="store_true", help="merge in float64 (output is float32 either way)"
    )


def register(sub) -> None:
    """Add ``fuse``, ``sweep``, ``demo`` and ``inspect`` to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "fuse",
        help="merge a concept and a style adapter into one GS adapter file",
        description="Merge CONCEPT (t=0) and STYLE (t=1) adapters (reference safetensors format or "
        "PEFT OFT, told apart by their keys) and write the merged adapter: --to reference writes a "
        "reference .safetensors file (raw Cayley parameters invCay(Y), so the reference's "
        "method='cayley' reproduces Y); --to peft writes a PEFT >= 0.16 OFT folder "
        "(adapter_config.json + adapter_model.safetensors, exact Cayley mode) that "
        "PeftModel.from_pretrained loads. Default: CONCEPT's format where it can hold the result.",
    )
    p.add_argument("concept", type=Path)
    p.add_argument("style", type=Path)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output .safetensors file (--to reference) or folder (--to peft); never an input",
    )
    p.add_argument(
        "--to",
        choices=["reference", "peft", "lycoris"],
        default=None,
        help="output format. peft needs a block-diagonal result (L = I, as every PEFT input) "
        "without output scales; a reference GS adapter cannot be written as PEFT OFT (fold it "
        "into the model with bake instead). lycoris: a LyCORIS diag-oft (or, from kohya inputs, "
        "kohya OFT) file, for LyCORIS/kohya inputs, which rotate output features. Default: the "
        "first input's format where it can hold the result, else reference",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing PEFT output folder (a reference output file is always replaced)",
    )
    p.add_argument("--t", type=float, default=0.6, help="position on the merge path (default 0.6)")
    _add_merge_options(p)
    p.set_defaults(func=cmd_fuse, cublas_gemm=True, prefetch=_prefetch)

    p = sub.add_parser(
        "sweep",
        help="per-t statistics of the merge path (streamed); write sweep.json and PNG plots",
        description="Sweep t, write DIR/sweep.json (per-t statistics) and PNGs: eigen-angle "
        "histograms, speed along t, distance to the straight ambient path.",
    )
    p.add_argument("concept", type=Path)
    p.add_argument("style", type=Path)
    p.add_argument("--ts", default="0:1:11", help="start:stop:count or comma list (default 0:1:11)")
    p.add_argument("--plot", type=Path, required=True, metavar="DIR", help="output directory")
    _add_merge_options(p)
    p.set_defaults(func=cmd_sweep, cublas_gemm=True, prefetch=_prefetch)

    p = sub.add_parser(
        "demo",
        help="write a built-in concept/style pair, then fuse and sweep it",
        description="Writes concept.safetensors and style.safetensors (deterministic, SDXL-shaped), "
        "fused.safetensors (t=0.6, geodesic + curve_over_id) and sweep/ (JSON + PNGs).",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: a new temporary directory)",
    )
    p.add_argument("--full-sdxl", action="store_true", help="all 560 SDXL layers instead of 16")
    p.set_defaults(func=cmd_demo, cublas_gemm=True)

    p = sub.add_parser(
        "inspect",
        help="format, layers, block shapes, rotation angles and problems of an adapter file",
    )
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_inspect)
