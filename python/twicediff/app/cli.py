"""The command line: ``python -m twicediff`` (or ``twicediff``) with subcommands

- ``demo``: find mislabeled training images of the shipped digits with influence functions
  (:mod:`twicediff.app.demo`); prints a table, saves a PNG under ``--output``;
- ``bench``: the batched Hessian-vector-product benchmark of :mod:`twicediff.app.bench` for one preset
  on the chosen device; prints a table, ``--plot`` saves a PNG, ``--json`` a machine-readable file;
- ``evaluate``: the linear datamodeling score and flipped-label detection of every influence
  method on the digits (:mod:`twicediff.evaluate`); prints a table, saves JSON and a PNG;
- ``info``: what the native extension was built against and what this machine offers.

Bad arguments print the usage and exit with status 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import torch

if TYPE_CHECKING:
    from .demo import DemoConfig

__all__ = ["build_parser", "demo_config", "device_facts", "main"]


from .arguments import (fraction as _fraction, int_list as _int_list, name_list as _name_list,
                        non_negative_float as _non_negative_float, non_negative_int as _non_negative_int,
                        positive_float as _positive_float, positive_int as _positive_int)


# ---- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import demo
    from .bench import UNTIMED_FIRST

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    common.add_argument("--output", metavar="DIR", default="out",
                        help="folder for the files written (created if missing; default: ./out)")
    common.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to compute; cuda needs a GPU and a CUDA build (default: cpu)")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                        help="progress bars on long steps (default: on when stderr is a terminal)")

    parser = argparse.ArgumentParser(
        prog="twicediff", description="twicediff: second-order information of a PyTorch model's loss.")
    parser.add_argument("--version", action="version", version=f"twicediff {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,evaluate,info}", required=True)

    p = commands.add_parser(
        "demo", parents=[common], help="find flipped labels in the shipped digits with influence functions",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = demo.DemoConfig()
    p.add_argument("--quick", action="store_true",
                   help="a reduced run for smoke tests: 400 training and 100 validation images")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help=f"training images (default: {defaults.n_train}; --quick: 400)")
    p.add_argument("--n-val", type=_positive_int, default=None,
                   help=f"validation images (default: {defaults.n_val}; --quick: 100)")
    p.add_argument("--flip-fraction", type=_fraction, default=defaults.flip_fraction,
                   help=f"fraction of training labels flipped (default: {defaults.flip_fraction})")
    p.add_argument("--regularization", type=_positive_float, default=defaults.regularization, metavar="LAMBDA",
                   help=f"Hessian damping λ in (H + λI)⁻¹ (default: {defaults.regularization}; see above)")
    p.add_argument("--kfac-damping", type=_positive_float, default=defaults.kfac_damping, metavar="FACTOR",
                   help=f"ekfac / kfac: damping as a multiple of each layer's mean eigenvalue (default: "
                        f"{defaults.kfac_damping}; see above)")
    p.add_argument("--method", choices=demo.METHODS, default=defaults.method,
                   help=f"inversion method: direct (explicit Hessian), cg (conjugate gradients), ekfac or kfac "
                        f"(Kronecker-factored curvature of the Linear layers) (default: {defaults.method})")
    p.add_argument("--weight-decay", type=_non_negative_float, default=defaults.weight_decay,
                   help=f"weight decay of the training objective (default: {defaults.weight_decay})")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point type of model and data (default: float32)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default: 1: the demo's matrices are small, so more threads gain "
                        "little, and one thread does not stall when other processes share the cores)")
    p.set_defaults(handler=_run_demo, parser=p)

    p = commands.add_parser(
        "bench", parents=[common], help="benchmark batched Hessian-vector products for a preset",
        description="Hessian-vector products per second of twicediff's engines and the baselines "
                    "(the per-direction autograd loop and torch.func forward-over-reverse) for one "
                    "preset model on the chosen device (twicediff.app.bench). Without options a quick "
                    "look: D = 1, 16, 64 and 3 repeats, rows printed as they are measured; --full "
                    "runs the sweep of the committed tables (D up to 256, 5 repeats). Peak memory "
                    "and the native op's GEMMs alone are measured by benchmarks/bench_mvp.py.")
    p.add_argument("--preset", default="a", help="which model (default: a); the list is in the error for "
                                                  "an unknown name and in twicediff.app.presets.PRESETS")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: D = 1,16,64,256 and 5 repeats (minutes on a small CPU)")
    p.add_argument("--directions", type=_int_list, default=None, metavar="D1,D2,...",
                   help="numbers of directions D (default: 1,16,64; --full: 1,16,64,256)")
    p.add_argument("--engines", type=_name_list, default=None, metavar="E1,E2,...",
                   help="twicediff engines to time, among native, func, autograd (default: all); the "
                        "baselines are always timed")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats (default: 3; --full: 5)")
    p.add_argument("--untimed-first", type=_non_negative_int, default=UNTIMED_FIRST, metavar="N",
                   help="untimed calls of a method right before each of its timings, so that none pays "
                        f"for what the one before it left on the heap (default: {UNTIMED_FIRST})")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--plot", action="store_true", help="also save a PNG plot under --output")
    p.add_argument("--json", action="store_true", help="also save the rows as JSON under --output")
    p.set_defaults(handler=_run_bench, parser=p)

    from . import evaluate_cli

    p = commands.add_parser("evaluate", parents=[common], help="how good each influence method is: LDS and "
                            "flipped-label detection on the digits", description=evaluate_cli.DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate_cli.add_arguments(p)
    p.set_defaults(handler=lambda args, parser: evaluate_cli.run(args), parser=p)

    p = commands.add_parser(
        "info", help="build and device facts",
        description="What twicediff's native extension was built against, and this machine's devices, "
                    "threads and memory budget.")
    p.add_argument("--json", action="store_true", help="print the facts as JSON instead of text")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads to report on (default: torch's own choice)")
    p.set_defaults(handler=_run_info, parser=p)
    return parser


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device != "cuda":
        return
    from .. import build_info

    info = build_info()
    if not torch.cuda.is_available():
        parser.error(f"argument --device: cuda was asked for but torch sees no CUDA device "
                     f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
    if not info["cuda_kernels"]:
        parser.error("argument --device: cuda was asked for but this twicediff was built without CUDA "
                     "kernels; rebuild it with a CUDA toolkit (see docs/building.md) or use --device cpu")


def _check_output(parser: argparse.ArgumentParser, path: str) -> None:
    """Fail before the work, not after it, when --output cannot be a folder."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"argument --output: expected a folder, got {path!r}, which is a file")
    if existing and not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        parser.error(f"argument --output: cannot write under {existing!r} (for the folder {path!r})")


def _output_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ---- subcommands ---------------------------------------------------------------------------------
def demo_config(args: argparse.Namespace) -> "DemoConfig":
    """The :class:`twicediff.app.demo.DemoConfig` that ``demo``'s parsed arguments ask for."""
    from .demo import DemoConfig

    quick = {"n_train": 400, "n_val": 100} if args.quick else {}
    sizes = {name: getattr(args, name) if getattr(args, name) is not None else quick.get(name, default)
             for name, default in (("n_train", DemoConfig.n_train), ("n_val", DemoConfig.n_val))}
    return DemoConfig(flip_fraction=args.flip_fraction, regularization=args.regularization, method=args.method,
                      kfac_damping=args.kfac_damping,
                      weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                      dtype=getattr(torch, args.dtype), progress=args.progress, **sizes)


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import demo
    from ..distributed import launched_by_torchrun

    config = demo_config(args)
    try:
        config.validate(demo.NUM_IMAGES)
    except ValueError as exc:
        parser.error(str(exc))
    # Under torchrun every rank computes its share and gets the whole result; rank 0 reports.
    with launched_by_torchrun(torch.device(config.device).type) as group:
        result = demo.run_demo(config)
    if group is not None and group.rank != 0:
        return 0
    print(demo.format_report(result))
    if group is not None:
        print(f"\n(torch.distributed: {group.size} processes, each with a shard of the training points)")
    stem = os.path.join(_output_dir(args.output), f"demo_seed{args.seed}")
    with open(stem + ".json", "w") as f:
        json.dump(demo.summary(result), f, indent=2)
    print(f"\nsaved {stem}.json: the figures above")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("twicediff demo: matplotlib is not installed, so no PNG was written "
              "(pip install 'twicediff[plot]')", file=sys.stderr)
        return 0
    demo.plot_demo(result, stem + ".png")
    print(f"saved {stem}.png: the most harmful training images and the score distributions")
    return 0


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import bench

    if args.preset not in bench.PRESETS:
        parser.error(f"argument --preset: expected one of {', '.join(sorted(bench.PRESETS))}, got {args.preset!r}")
    unknown = sorted(set(args.engines or ()) - set(bench.ENGINES))
    if unknown:
        parser.error(f"argument --engines: expected names among {', '.join(bench.ENGINES)}, got {', '.join(unknown)}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib (pip install 'twicediff[plot]')")
    directions = args.directions or (bench.FULL_DIRECTIONS if args.full else bench.QUICK_DIRECTIONS)
    repeats = args.repeats or (bench.FULL_REPEATS if args.full else bench.QUICK_REPEATS)
    print(f"bench: preset {args.preset} ({bench.PRESETS[args.preset][0]}) on {args.device}, "
          f"D = {', '.join(map(str, directions))}, {bench.timing_words(repeats, args.untimed_first)}; "
          "a block of rows per D as it finishes", flush=True)
    print(bench.TABLE_HEADER, flush=True)

    def show(rows):
        print("\n".join(bench.format_row(r) for r in rows), flush=True)

    torch.manual_seed(args.seed)
    rows = bench.run(preset=args.preset, device=args.device, directions=directions, repeats=repeats,
                     engines=args.engines, threads=args.threads, progress=args.progress, on_rows=show,
                     untimed_first=args.untimed_first)
    summary = bench.format_table(rows).split("\n\nBudget check", 1)
    if len(summary) == 2:
        print("\nBudget check" + summary[1])
    stem = f"bench_{args.preset}_{args.device}"
    if args.plot:
        path = os.path.join(_output_dir(args.output), stem + ".png")
        bench.plot(rows, path)
        print(f"saved {path}")
    if args.json:
        path = os.path.join(_output_dir(args.output), stem + ".json")
        bench.to_json(rows, path)
        print(f"saved {path}")
    return 0


def device_facts() -> Dict[str, Any]:
    """Build facts (``build_info()``) plus this process's devices, threads and memory budgets."""
    from .. import __version__, build_info
    from ..inversion import InversionMethod
    from ..memory import get_memory_budget

    facts: Dict[str, Any] = {
        "twicediff": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "build": build_info(),
        "cpu": {"logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "memory_budget_bytes": get_memory_budget("cpu")},
        "cuda_devices": [],
        "inversion_methods": [m.value for m in InversionMethod],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts["cuda_devices"].append({
                "index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                "total_memory_bytes": props.total_memory,
                "memory_budget_bytes": get_memory_budget(torch.device("cuda", index))})
    return facts


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _run_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    facts = device_facts()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    build = facts["build"]
    lines = [f"twicediff {facts['twicediff']} on Python {facts['python']} ({facts['platform']})", "build:"]
    lines += [f"  {key:<14} {value}" for key, value in build.items()]
    cpu = facts["cpu"]
    lines += ["cpu:",
              f"  {'logical cores':<14} {cpu['logical_cores']}",
              f"  {'torch threads':<14} {cpu['torch_threads']} (interop {cpu['torch_interop_threads']})",
              f"  {'memory budget':<14} {_format_bytes(cpu['memory_budget_bytes'])} per chunk "
              "(twicediff.set_memory_budget to change)"]
    if facts["cuda_devices"]:
        lines.append("cuda devices:")
        for d in facts["cuda_devices"]:
            lines.append(f"  cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}), "
                         f"{_format_bytes(d['total_memory_bytes'])}, memory budget "
                         f"{_format_bytes(d['memory_budget_bytes'])} per chunk")
    else:
        lines.append("cuda devices: none visible to torch")
    lines.append(f"inversion methods: {', '.join(facts['inversion_methods'])}")
    print("\n".join(lines))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m twicediff`` and the ``twicediff`` console script; returns the exit
    status (0 success, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.command != "info":
        _check_device(args.parser, args.device)
        _check_output(args.parser, args.output)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return int(args.handler(args, args.parser))
