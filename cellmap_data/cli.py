"""Command line of ``cellmap_data``: ``python -m cellmap_data <command> ...``.

Each subcommand is a :class:`Subcommand` in :data:`SUBCOMMANDS`; add one with
:func:`register`.  Its ``run`` gets the parsed arguments and returns an exit
code.  Bad input ends in a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "cmd_synth", "main", "register"]

USAGE_ERROR = 2


class UsageError(Exception):
    """Invalid user input: reported on one line, exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(subcommand: Subcommand) -> Subcommand:
    """Add (or replace) a subcommand of ``python -m cellmap_data``."""
    SUBCOMMANDS[subcommand.name] = subcommand
    return subcommand


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cellmap_data", description="Tools of the cellmap_data package.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS.values():
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(_run=subcommand.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # --help, --version
            return int(exit_request.code or 0)
        if getattr(args, "_run", None) is None:
            raise UsageError(f"cellmap_data: error: choose a command: {', '.join(SUBCOMMANDS)}")
        return int(args._run(args) or 0)
    except UsageError as error:
        print(str(error), file=sys.stderr)
        return USAGE_ERROR
    except (FileNotFoundError, ValueError, PermissionError) as error:
        # Bad input (missing paths, malformed metadata, bad configuration): one line, exit 2.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"cellmap_data: error: {message}", file=sys.stderr)
        return USAGE_ERROR


# ----------------------------------------------------------------------------- synth


def _parse_size(text: str):
    """``tiny``/``small``/``bench`` or an explicit raw shape ``ZxYxX``."""
    from cellmap_data.synthetic import SIZE_PRESETS

    if text in SIZE_PRESETS:
        return text
    parts = text.lower().split("x")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return tuple(int(part) for part in parts)
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(SIZE_PRESETS)} or ZxYxX, got {text!r}")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the containers and datasplit.csv to")
    parser.add_argument("--size", type=_parse_size, default="tiny", help="tiny, small, bench or ZxYxX (default tiny)")
    parser.add_argument("--datasets", type=_positive_int, default=2, help="number of datasets (default 2)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=2, help="Zarr format (default 2)")
    parser.add_argument("--sharded", action="store_true", help="shard arrays (Zarr v3 only)")
    parser.add_argument("--compressor", choices=("zstd", "blosc"), default="zstd", help="default zstd")
    parser.add_argument(
        "--dimension-separator", choices=(".", "/"), default=".", help="chunk-key separator for Zarr v2"
    )
    parser.add_argument("--no-counts", action="store_true", help="omit complement_counts on label arrays")


def cmd_synth(args: argparse.Namespace) -> int:
    """Write synthetic CellMap-style data and print where it went."""
    from cellmap_data.synthetic import make_synthetic_data

    started = time.perf_counter()
    try:
        data = make_synthetic_data(
            args.out_dir,
            size=args.size,
            n_datasets=args.datasets,
            seed=args.seed,
            zarr_format=args.zarr_format,
            sharded=args.sharded,
            compressor=args.compressor,
            write_counts=not args.no_counts,
            dimension_separator=args.dimension_separator,
        )
    except (ValueError, ImportError) as error:
        raise UsageError(f"cellmap_data synth: error: {error}") from None
    elapsed = time.perf_counter() - started

    n_crops = len(data.crops)
    print(f"wrote {len(data.datasets)} datasets, {n_crops} crops to {data.root} in {elapsed:.1f} s")
    for dataset in data.datasets:
        shape = "x".join(str(n) for n in dataset.raw_shape)
        voxel = ", ".join(f"{v:g}" for v in dataset.raw_voxel_size)
        print(f"  {dataset.raw_path}  s0 {shape} @ ({voxel}) nm")
        for crop in dataset.crops:
            crop_shape = "x".join(str(n) for n in crop.shape)
            crop_voxel = ", ".join(f"{v:g}" for v in crop.voxel_size)
            print(f"    {crop.name:<7} {crop.usage:<8} {crop_shape} @ ({crop_voxel}) nm  [{','.join(crop.classes)}]")
    print(f"datasplit: {data.csv_path}")
    return 0


register(
    Subcommand(
        name="synth",
        help="write synthetic CellMap-style Zarr data and a datasplit CSV",
        add_arguments=_add_synth_arguments,
        run=cmd_synth,
    )
)


# ----------------------------------------------------------------------------- demo and bench


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="where to write the demo data (default: a temporary folder)")
    parser.add_argument("--size", default="small", type=_parse_size, help="synthetic data size (default: small)")
    parser.add_argument("--batches", default=20, type=_positive_int, help="batches to load (default: 20)")
    parser.add_argument("--batch-size", default=8, type=_positive_int)
    parser.add_argument("--threads", default=0, type=_non_negative_int, help="engine threads (0: one per core)")


def cmd_demo(args: argparse.Namespace) -> int:
    from cellmap_data.demo import run_demo

    run_demo(out=args.out, size=args.size, batches=args.batches, batch_size=args.batch_size, threads=args.threads)
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="benchmark data folder (default: generated once under ~/.cache)")
    parser.add_argument("--size", default="bench", help="synthetic data size (default: bench, ~0.5 GB raw)")
    parser.add_argument("--batches", default=40, type=_positive_int, help="batches per configuration")
    parser.add_argument("--threads", default=None, type=_positive_int, action="append", help="engine threads (repeatable)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--soak", default=0, type=_non_negative_int, help="also run a memory soak of this many batches (e.g. 10000)")
    parser.add_argument("--loader-threads", default=None, type=_positive_int, action="append",
                        help="engine threads of the loader runs (repeatable; default 1 and 2)")
    parser.add_argument("--device", default=None,
                        help="also deliver the loader's batches to this torch device (e.g. cuda) and compare with CPU delivery")
    parser.add_argument("--repeat", default=1, type=_positive_int,
                        help="run each engine configuration this many times and report medians (default 1)")
    parser.add_argument("--engine", default=True, action=argparse.BooleanOptionalAction,
                        help="run the engine configurations (default) or only the loader")
    parser.add_argument("--transforms", default=True, action=argparse.BooleanOptionalAction,
                        help="compare the split's default value transforms with none through the public API (default)")


def cmd_bench(args: argparse.Namespace) -> int:
    from cellmap_data.bench import run

    run(data_dir=args.data, size=args.size, batches=args.batches, threads=args.threads, out=args.json, soak=args.soak,
        loader_threads=args.loader_threads, device=args.device, engine=args.engine, repeat=args.repeat,
        transforms=args.transforms)
    return 0


register(Subcommand(name="demo", help="generate a small dataset and stream training batches from it",
                    add_arguments=_add_demo_arguments, run=cmd_demo))
register(Subcommand(name="bench", help="measure sampling and loader throughput against their bounds",
                    add_arguments=_add_bench_arguments, run=cmd_bench))
