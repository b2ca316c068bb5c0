"""Command line of ``cellmap_data``: ``python -m cellmap_data <command> ...`` (also installed as
``cellmap-data``).

Each subcommand is a :class:`Subcommand` in :data:`SUBCOMMANDS`; add one with
:func:`register`.  Its ``run`` gets the parsed arguments and returns an exit code.

Errors end in one line on stderr, without a traceback (``--debug``, before or after the
command, shows it): exit code 2 for bad input (arguments, missing paths, malformed metadata or
CSV, unknown classes), 1 for a failure while reading data or an unexpected error, 130 when
interrupted.  Warnings are printed on one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from cellmap_data.presentation.formatting import short_names, text_table, triple_text

if TYPE_CHECKING:
    from cellmap_data.describe import Codec, NodeDescription

__all__ = [
    "SUBCOMMANDS", "Subcommand", "build_parser", "cmd_inspect", "cmd_stats", "cmd_synth", "main", "register",
]

#: Exit code of bad input (arguments, paths, metadata, configuration).
USAGE_ERROR = 2
#: Exit code of a failure while reading data, or of an unexpected error.
RUN_ERROR = 1
#: Exit code after Ctrl-C.
INTERRUPTED = 130


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


_DEBUG_HELP = "show the Python traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cellmap_data", description="Tools of the cellmap_data package.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS.values():
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        # Accepted after the command too; SUPPRESS keeps a --debug given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        subcommand.add_arguments(sub)
        sub.set_defaults(_run=subcommand.run)
    return parser


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _exit_code(error: BaseException) -> int:
    if isinstance(error, (UsageError, ValueError, FileNotFoundError, PermissionError, FileExistsError,
                          NotADirectoryError, IsADirectoryError)):
        return USAGE_ERROR
    return RUN_ERROR


def _error_line(error: BaseException, command: str | None) -> str:
    prefix = f"cellmap_data {command}" if command else "cellmap_data"
    message = _first_line(error)
    if isinstance(error, UsageError) and message.startswith("cellmap_data"):
        return message
    from cellmap_data.exceptions import CellMapError

    if isinstance(error, (UsageError, CellMapError, OSError, ValueError)):
        return f"{prefix}: error: {message}"
    return f"{prefix}: internal error: {type(error).__name__}: {message} (--debug shows the traceback)"


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings as ``cellmap_data <command>: warning: <first line>`` on stderr."""
    with warnings.catch_warnings():
        def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            text = _first_line(message) if str(message) else category.__name__
            print(f"cellmap_data {command}: warning: {text}", file=sys.stderr)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # --help
            return int(exit_request.code or 0)
        if getattr(args, "_run", None) is None:
            raise UsageError(f"cellmap_data: error: choose a command: {', '.join(SUBCOMMANDS)}")
        if args.debug:
            return int(args._run(args) or 0)
        with _one_line_warnings(args.command):
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cellmap_data: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        command = getattr(args, "command", None)
        if args is not None and getattr(args, "debug", False):
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(_error_line(error, command), file=sys.stderr)
        return _exit_code(error)


# ----------------------------------------------------------------------------- synth


def _parse_size(text: str):
    """``tiny``/``small``/``bench`` or an explicit raw shape ``ZxYxX``."""
    from cellmap_data.tools.synthetic import SIZE_PRESETS

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
    from cellmap_data.tools.synthetic import make_synthetic_data

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
    from cellmap_data.tools.demo import run_demo

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
    parser.add_argument("--writer-ranks", default=False, action="store_true",
                        help="only measure prediction writing by 1 and 2 processes, plain and blended "
                             "(medians of --repeat runs; bound: 2 processes >= 1.6x one)")
    parser.add_argument("--remote", default=False, action="store_true",
                        help="only measure reading over a loopback HTTP server with 20 and 50 ms per request and 1, 8, 32 "
                             "and 64 requests in flight, against the same data read locally")
    parser.add_argument("--remote-sharded", default=False, action="store_true",
                        help="only measure the loader reading a sharded zarr v3 split (shards of 8³ chunks of 64³) over "
                             "a loopback HTTP server at 20 ms per request: requests, MB and wait per batch, and a digest "
                             "of the batches; with --against DIR, that build too, interleaved")
    parser.add_argument("--chunks-per-shard", default=8, type=_positive_int,
                        help="with --remote-sharded: chunks of 64³ per shard along each axis (default 8: shards of 512³)")
    parser.add_argument("--crops", default=None, metavar="N[,N...]",
                        help="only run the many-crop table: a split of N crops over N/4 volumes (e.g. 6,48,144,400) "
                             "through the public API, with samples/s, first batch, peak RSS, decoded bytes per sample, "
                             "hit rate and the decode-bound floor; then the 6-crop head-to-head configurations")
    parser.add_argument("--reference", default=None, metavar="PYTHON",
                        help="with --crops: the interpreter of a separate venv holding the reference cellmap-data "
                             "release; its loader is measured on the same split, interleaved, for the ratios")
    parser.add_argument("--against", default=None, metavar="DIR",
                        help="only compare this build with another one installed in DIR (pip install --target DIR "
                             "WHEEL): loader and writer through the public API, interleaved, medians of --repeat runs")


def cmd_bench(args: argparse.Namespace) -> int:
    from cellmap_data.tools.bench import bench_data, compare_builds, run

    if args.writer_ranks:
        from cellmap_data.tools.bench import bench_writer_ranks

        r = bench_writer_ranks(bench_data(args.data, args.size), repeat=args.repeat)
        for name, run_ in r["runs"].items():
            bound = (f"  speedup {run_['speedup']:.2f}x over one process with the same share (bound >= 1.6: "
                     f"{'met' if run_['speedup'] >= 1.6 else 'MISSED'})" if run_["processes"] == 2 else
                     f"  {run_['speedup']:.2f}x" if run_["threads_per_process"] != r["threads_per_process"] else "")
            print(f"writer {name:<24} {run_['mb_per_s']:8.1f} MB/s of volume ({r['volume_mb']:.0f} MB, tiles per rank "
                  f"{run_['tiles_per_rank']}, medians of {r['repeat']}){bound}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 0
    if args.remote:
        from cellmap_data.tools.bench import REMOTE_COLD_BOUND, REMOTE_WARM_BOUND, bench_remote

        r = bench_remote(bench_data(args.data, args.size), threads=(args.loader_threads or [2])[-1])
        print(f"local            cold {r['local_cold_samples_per_s']:7.1f} samples/s  warm {r['local_warm_samples_per_s']:7.1f} samples/s "
              f"({r['samples']} samples of 64³ + 4 classes, augmented, {r['threads']} threads)")
        for name, row in r["runs"].items():
            checks = []
            if row["latency_s"] == 0.02:
                checks.append(f"warm/local {row['warm_vs_local']:.2f} (bound >= {REMOTE_WARM_BOUND}: "
                              f"{'met' if row['warm_vs_local'] >= REMOTE_WARM_BOUND else 'MISSED'})")
                if row["in_flight"] == 64:
                    checks.append(f"cold/no-latency cold {row['cold_vs_no_latency']:.2f} (bound >= {REMOTE_COLD_BOUND}: "
                                  f"{'met' if row['cold_vs_no_latency'] >= REMOTE_COLD_BOUND else 'MISSED'})")
            print(f"remote {name:<9} cold {row['cold_samples_per_s']:7.1f} samples/s  warm {row['warm_samples_per_s']:7.1f} samples/s  "
                  f"{row['requests']:5d} requests, {row['mb_fetched']:6.1f} MB, peak {row['peak_in_flight']:2d} in flight  "
                  f"cold/no-latency {row['cold_vs_no_latency']:.2f}  " + "  ".join(checks))
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 0
    if args.remote_sharded:
        from cellmap_data.tools.bench import bench_remote_sharded, sharded_bench_data

        r = bench_remote_sharded(args.against, sharded_bench_data(args.chunks_per_shard), repeat=args.repeat, batches=args.batches,
                                 threads=(args.loader_threads or [2])[-1])
        for which, b in r["builds"].items():
            if "error" in b:
                print(f"{which:<17} refused the data: {b['error'][:300]}")
                continue
            print(f"{which:<17} {b['requests_per_batch']:6.1f} requests/batch ({b['ranged_requests_per_batch']:.1f} byte ranges)  "
                  f"{b['mb_per_batch']:7.1f} MB/batch  wait {b['batch_wait_s'] * 1000:7.1f} ms/batch (median)  "
                  f"epoch {b['epoch_s']:6.2f} s  ({b['opening_requests']:.0f} requests to open; {b['version']} at {b['file']})")
        print(f"{r['batches']} batches of 8 at {r['latency_s'] * 1000:g} ms per request, medians of {r['repeat']} cold runs"
              f"{', interleaved' if len(r['builds']) > 1 else ''}; batches bit-identical across runs and builds: "
              f"{'yes' if r['bit_identical'] else 'NO'}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 1 if not r["bit_identical"] else 0
    if args.crops:
        from cellmap_data.tools import bench_crops

        counts = tuple(int(n) for n in str(args.crops).split(",") if n.strip())
        threads = (args.loader_threads or [2])[-1]
        r = bench_crops.run(counts, reference=args.reference, repeat=args.repeat, threads=threads)
        if args.soak:
            n = 144 if 144 in counts else max(counts)
            s = bench_crops.soak(str(bench_crops.crops_data(n).csv_path), batches=args.soak, threads=threads)
            r["soak"] = s
            print(f"\nsoak at {n} crops, {s['batches']} batches in {s['seconds']:.0f} s: peak RSS {s['peak_rss_mb']:.0f} MB "
                  f"(bound {s['bound_mb']:.0f} MB = chunk budget {s['chunk_budget_mb']:.0f} + label budget "
                  f"{s['label_budget_mb']:.0f} + {bench_crops.SOAK_SLACK_MB}: {'met' if s['within_bound'] else 'MISSED'}); "
                  f"RSS net of the caches grew {s['net_of_caches_growth_mb']:.0f} MB after warm-up (bound "
                  f"{s['growth_bound_mb']:.0f} MB: {'flat' if s['flat'] else 'GROWING'})")
            print("  (batch, RSS MB, chunk cache MB, label cache MB, RSS net of the caches MB): " + ", ".join(map(str, s["curve"])))
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2, default=str))
        return 0
    if args.against:
        data = bench_data(args.data, args.size)
        r = compare_builds(args.against, data, repeat=args.repeat, batches=min(args.batches, 20),
                           threads=(args.loader_threads or [2])[-1])
        for key, unit in (("loader_samples_per_s", "samples/s"), ("writer_mvoxels_per_s", "Mvoxel/s")):
            ratio = r[key.replace("_per_s", "_ratio")]
            print(f"{key.split('_')[0]:<7} other {r['other'][key]:8.2f} {unit}  this {r['this'][key]:8.2f} {unit}  "
                  f"ratio {ratio:.2f} (bound >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'}; medians of {r['repeat']}, "
                  f"interleaved; other {r['other'][key + '_all']}, this {r['this'][key + '_all']})")
        print(f"other: {r['other']['version']} at {r['other']['file']}\nthis:  {r['this']['version']} at {r['this']['file']}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 0
    run(data_dir=args.data, size=args.size, batches=args.batches, threads=args.threads, out=args.json, soak=args.soak,
        loader_threads=args.loader_threads, device=args.device, engine=args.engine, repeat=args.repeat,
        transforms=args.transforms)
    return 0


register(Subcommand(name="demo", help="generate a small dataset and stream training batches from it",
                    add_arguments=_add_demo_arguments, run=cmd_demo))
register(Subcommand(name="bench", help="measure sampling and loader throughput against their bounds",
                    add_arguments=_add_bench_arguments, run=cmd_bench))


# ----------------------------------------------------------------------------- zarr metadata (json only)

#: How deep ``inspect`` and ``stats`` look for image groups and label crops under a container.
MAX_SEARCH_DEPTH = 6

_CONTAINER_SUFFIXES = (".zarr", ".n5")


@dataclass
class _Node:
    """A zarr node as the engine describes it (no chunk is read), or one whose metadata could not
    be read (``kind == "broken"``, with the first line of the error)."""

    path: str
    kind: str | None  # "group", "array", "broken" (unreadable metadata) or None (not a zarr node)
    description: NodeDescription | None = None
    error: str = ""

    @property
    def zarr_format(self) -> int | None:
        return self.description.zarr_format if self.description else None

    @property
    def is_image(self) -> bool:
        return self.description is not None and self.description.is_image

    @property
    def first_level(self) -> str | None:
        multiscale = self.description.multiscale if self.description else None
        return multiscale.levels[0].path if multiscale and multiscale.levels else None

    @property
    def annotation(self) -> dict[str, Any]:
        cellmap = self.description.attributes.get("cellmap") if self.description else None
        annotation = cellmap.get("annotation") if isinstance(cellmap, dict) else None
        return annotation if isinstance(annotation, dict) else {}


def _node(path: str) -> _Node:
    """The zarr node at ``path`` (a folder or an object-store URL), described by the engine."""
    from cellmap_data.describe import describe

    description = describe(path)
    return _Node(path, description.kind, description)


def _child_dirs(path: str) -> list[str]:
    from cellmap_data.remote import is_url

    if is_url(path):
        # Object stores are never listed (CellMap buckets are large): name what to read.
        raise UsageError(f"cellmap_data: error: {path}: an object store is not listed; pass an image group URL, "
                         "or a label crop as .../crop/[class,...]")
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _node_or_broken(path: str) -> _Node:
    """:func:`_node`, or a node of kind ``"broken"`` carrying the error when its metadata is
    unreadable (a listing goes on past it)."""
    try:
        return _node(path)
    except (OSError, ValueError) as error:
        return _Node(path, "broken", error=_first_line(error))


def _child_images(path: str) -> list[_Node]:
    nodes = (_node_or_broken(os.path.join(path, name)) for name in _child_dirs(path))
    return [node for node in nodes if node.is_image]


def _looks_like_crop(node: _Node, images: Sequence[_Node]) -> bool:
    """A label crop group: a group (not an image) whose children include class image groups,
    under a ``labels`` folder or carrying CellMap annotation metadata."""
    if node.kind != "group" or node.is_image or not images:
        return False
    parts = os.path.normpath(os.path.abspath(node.path)).split(os.sep)
    return "labels" in parts or bool(node.annotation) or any(image.annotation for image in images)


def _scan(root: str, max_depth: int = MAX_SEARCH_DEPTH) -> tuple[list[_Node], list[tuple[_Node, list[_Node]]]]:
    """Image groups (outside label crops) and label crop groups (with their class images) under
    ``root``, at most ``max_depth`` folders down; arrays and image groups are not entered."""
    images: list[_Node] = []
    crops: list[tuple[_Node, list[_Node]]] = []

    def visit(path: str, depth: int) -> None:
        for name in _child_dirs(path):
            node = _node_or_broken(os.path.join(path, name))
            if node.kind == "array":
                continue
            if node.is_image or node.kind == "broken":
                images.append(node)
                continue
            if depth + 1 < max_depth:
                children = _child_images(node.path)
                if _looks_like_crop(node, children):
                    crops.append((node, children))
                    continue
                visit(node.path, depth + 1)

    visit(root, 0)
    return images, crops


def _not_found(path: str) -> Exception:
    from cellmap_data.exceptions import NotFoundError

    return NotFoundError(f"{path}: no such file or directory")


def _not_a_group(path: str) -> Exception:
    from cellmap_data.exceptions import MetadataError

    what = "a file" if os.path.isfile(path) else "a folder without zarr.json, .zgroup or .zattrs"
    return MetadataError(f"{path}: not a zarr group ({what})")


# ----------------------------------------------------------------------------- formatting


def _shape(values: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in values)


def _codec_text(name: str, config: Any) -> str:
    if not isinstance(config, dict) or not config:
        return name
    parts = []
    for key, value in config.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = str(value).lower()
        parts.append(f"{key}={value}")
    return f"{name}({', '.join(parts)})"


def _codecs_text(codecs: Sequence[Codec]) -> str:
    texts = []
    for codec in codecs:
        if codec.name == "sharding_indexed":
            texts.append(f"sharding_indexed({_codecs_text(codec.inner)})")
        else:
            texts.append(_codec_text(codec.name, codec.configuration))
    return ", ".join(texts) or "none"


def _array_codecs(node: _Node) -> str:
    """The codecs of a zarr array (zarr v3 form; a sharded array's inner codecs in brackets)."""
    array = node.description.array if node.kind == "array" and node.description else None
    if array is None:
        return "?"
    text = _codecs_text(array.codecs)
    if array.inner_chunks is not None:
        text = text.replace("sharding_indexed(", f"sharding_indexed(inner chunks {_shape(array.inner_chunks)}: ", 1)
    return text


# ----------------------------------------------------------------------------- inspect


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="ZARR_PATH",
                        help="an OME-NGFF image group, a label crop group or a .zarr container")
    parser.add_argument("--depth", type=_positive_int, default=MAX_SEARCH_DEPTH,
                        help=f"how many folders deep to look under a container (default {MAX_SEARCH_DEPTH})")


def _axes_text(axes: Sequence[Any]) -> str:
    """``z, y, x (space, nanometer)``, or each axis with its own type and unit when they differ."""
    parsed = [(list(axis) + [None, None])[:3] for axis in axes]
    extras = [", ".join(str(v) for v in (kind, unit) if v) for _, kind, unit in parsed]
    names = [str(name) for name, _, _ in parsed]
    if len(set(extras)) == 1:
        return ", ".join(names) + (f" ({extras[0]})" if extras[0] else "")
    return ", ".join(f"{n} ({e})" if e else n for n, e in zip(names, extras))


def _image_report(path: str, indent: str = "") -> list[str]:
    """Lines describing one OME-NGFF image group: version, axes and a table of its levels."""
    from cellmap_data import _engine

    node = _node(path)
    volume = _engine.Volume(path)
    levels = volume.levels
    lines = [f"{indent}OME-NGFF {volume.ngff_version} image, zarr v{node.zarr_format}, "
             f"{len(levels)} level{'s' if len(levels) != 1 else ''}; axes {_axes_text(volume.axes)}"]
    annotation = node.annotation
    if annotation:
        kind = annotation.get("annotation_type")
        kind = kind.get("type") if isinstance(kind, dict) else kind
        described = ", ".join(str(v) for v in (annotation.get("class_name"), kind) if v)
        if described:
            lines.append(f"{indent}label: {described}")
    rows, counts = [], []
    for level in levels:
        array = _node_or_broken(os.path.join(path, level["path"]))
        lo, hi = level["world_box"]
        complement = array.annotation.get("complement_counts")
        counts.append(", ".join(f"{k}={v}" for k, v in complement.items()) if isinstance(complement, dict) else "")
        rows.append([
            level["path"], _shape(level["shape"]), _stored_chunks(array, level["chunks"]), str(level["dtype"]),
            triple_text(level["voxel_size"], ","), triple_text(level["translation"], ","),
            f"({triple_text(lo, ',')})-({triple_text(hi, ',')})", _array_codecs(array),
        ])
    headers = ["level", "shape", "chunks", "dtype", "voxel size (nm)", "translation (nm)", "world box (nm)", "codecs"]
    if any(counts):
        headers.append("complement_counts")
        rows = [row + [count or "-"] for row, count in zip(rows, counts)]
    lines.append(text_table(headers, rows, indent=indent + "  "))
    return lines


def _progress(items: Sequence[Any], desc: str, unit: str) -> Any:
    """A tqdm bar over ``items`` that appears only after a second, and only on a terminal."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(items, desc=desc, unit=unit, delay=1.0, disable=None, leave=False)


def _stored_chunks(array: _Node, read_chunks: Sequence[int]) -> str:
    """The chunk shape as stored (a sharded array's shards), else the engine's read unit."""
    layout = array.description.array if array.description else None
    return _shape(layout.chunks[-3:]) if layout is not None else _shape(read_chunks)


def _summary(node: _Node, first: _Node | None = None) -> tuple[str, str, str, str, str]:
    """(levels, s0 shape, chunks, dtype, voxel size) of an image group, or an error note; the
    chunks as stored when its described first level ``first`` is given."""
    from cellmap_data import _engine
    from cellmap_data.exceptions import CellMapError

    if node.kind == "broken":
        return ("error", node.error, "", "", "")
    try:
        volume = _engine.Volume(node.path)
        s0 = volume.levels[0]
    except (CellMapError, OSError, ValueError, IndexError) as error:
        return ("error", _first_line(error), "", "", "")
    chunks = _stored_chunks(first, s0["chunks"]) if first is not None else _shape(s0["chunks"])
    return (f"{len(volume.levels)} ({volume.ngff_version})", _shape(s0["shape"]), chunks,
            str(s0["dtype"]), triple_text(s0["voxel_size"], ","))


def _container_report(path: str, max_depth: int) -> list[str]:
    images, crops = _scan(path, max_depth)
    node = _node(path)
    lines = [f"{path}: zarr v{node.zarr_format} group; {len(images)} image group{'s' if len(images) != 1 else ''}, "
             f"{len(crops)} label crop{'s' if len(crops) != 1 else ''} (searched {max_depth} levels deep)"]
    rel = lambda p: os.path.relpath(p, path)  # noqa: E731
    if images:
        rows = []
        for image in _progress(images, "reading image metadata", "group"):
            first = _first_level(image)
            levels, shape, chunks, dtype, voxel = _summary(image, first)
            rows.append([rel(image.path), levels, shape, chunks, dtype, voxel, _array_codecs(first)])
        lines.append("image groups:")
        lines.append(text_table(["path", "levels (ngff)", "s0 shape", "s0 chunks", "dtype", "s0 voxel size (nm)",
                             "codecs"], rows))
    if crops:
        rows = []
        for crop, classes in _progress(crops, "reading crop metadata", "crop"):
            _, shape, _, dtype, voxel = _summary(classes[0])
            names = ",".join(os.path.basename(c.path) for c in classes)
            rows.append([rel(crop.path), str(len(classes)), names, shape, dtype, voxel])
        lines.append("label crops (first class's s0):")
        lines.append(text_table(["path", "classes", "names", "s0 shape", "dtype", "voxel size (nm)"], rows))
    if not images and not crops:
        lines.append(f"no OME-NGFF image group found under {path}")
    return lines


def _first_level(image: _Node) -> _Node:
    first = image.first_level
    return _node_or_broken(os.path.join(image.path, first)) if first is not None else _Node(image.path, None)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the levels of an image group, the classes of a crop, or the images of a container."""
    from cellmap_data.remote import groups_exist, is_url

    remote = is_url(args.path)
    path = args.path.rstrip("/") if remote else os.path.normpath(args.path)
    if not (groups_exist([path])[0] if remote else os.path.exists(path)):
        raise _not_found(path)
    node = _node(path)
    if node.kind == "array":
        parent = os.path.dirname(path)
        if _node(parent).is_image:
            print(f"{path} is level {os.path.basename(path)} of image group {parent}")
            path, node = parent, _node(parent)
        else:
            print(f"{path}: zarr v{node.zarr_format} array, codecs {_array_codecs(node)}")
            return 0
    if node.kind is None:
        raise _not_a_group(path)
    if node.is_image:
        lines = [f"{path}:"] + _image_report(path, indent="  ")
    else:
        classes = _child_images(path)
        if _looks_like_crop(node, classes):
            names = ", ".join(os.path.basename(c.path) for c in classes)
            lines = [f"{path}: label crop group, {len(classes)} class{'es' if len(classes) != 1 else ''}: {names}"]
            for image in _progress(classes, "reading class metadata", "class"):
                lines.append(f"  {os.path.basename(image.path)}:")
                lines.extend(_image_report(image.path, indent="    "))
        else:
            lines = _container_report(path, args.depth)
    print("\n".join(lines))
    return 0


register(Subcommand(name="inspect", help="show the levels, chunks, codecs and world boxes of OME-NGFF zarr data",
                    add_arguments=_add_inspect_arguments, run=cmd_inspect))


# ----------------------------------------------------------------------------- stats


def _class_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return list(dict.fromkeys(names))


def _scale(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace("x", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(v > 0 and v != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected a voxel size Z,Y,X or one number (nm, > 0), got {text!r}")
    return (values[0], values[1], values[2])


def _add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CSV_OR_PATH",
                        help="a datasplit CSV, a label crop group (.../crop1), a crop template "
                             "(.../crop1/[mito,er]) or a .zarr container")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the whole table (every column and row) to FILE.parquet or FILE.csv")
    parser.add_argument("--classes", type=_class_list, default=None, metavar="A,B,...",
                        help="classes to report (default: every class the CSV or the crops list)")
    parser.add_argument("--input-scale", type=_scale, default=None, metavar="Z,Y,X",
                        help="training voxel size in nm the counts are expressed in: Z,Y,X or one number "
                             "(default: s0 voxel size of the first raw image)")
    parser.add_argument("--raw", default=None, metavar="IMAGE",
                        help="raw image group of the crops of a path input (default: the image group in the "
                             "nearest 'em' folder above the crop, preferring uint8)")
    parser.add_argument("--all-rows", action="store_true", help="also print the (crop, class) rows a crop does not annotate")
    parser.add_argument("--wide", action="store_true", help="print every column of the table")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the count cache (counts come from metadata or a scan)")


def _find_raw(crop: str) -> str | None:
    """The raw image next to a CellMap crop: an image group in ``<ancestor>/em`` (uint8 first).
    Over an object store (never listed) the CellMap name ``<ancestor>/em/fibsem-uint8`` is
    looked for, every ancestor in one round trip."""
    from cellmap_data.remote import groups_exist, is_url

    if is_url(crop):
        candidates, folder = [], crop.rstrip("/").rsplit("/", 1)[0]
        for _ in range(MAX_SEARCH_DEPTH):
            candidates.append(f"{folder}/em/fibsem-uint8")
            if folder.endswith(_CONTAINER_SUFFIXES) or folder.count("/") <= 3:
                break
            folder = folder.rsplit("/", 1)[0]
        return next((c for c, found in zip(candidates, groups_exist(candidates)) if found), None)
    folder = os.path.dirname(os.path.abspath(crop))
    for _ in range(MAX_SEARCH_DEPTH):
        images = _child_images(os.path.join(folder, "em"))
        if images:
            images.sort(key=lambda node: ("uint8" not in os.path.basename(node.path), node.path))
            return images[0].path
        if folder.endswith(_CONTAINER_SUFFIXES) or os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    return None


def _raw_for(crop: str, raw: str | None, source: str) -> str:
    found = raw or _find_raw(crop)
    if found is None:
        raise UsageError(f"cellmap_data stats: error: {source}: no raw image group found for {crop} "
                         "(looked for <...>/em/<image> above it); pass --raw")
    return found


def _stats_rows(source: str, raw: str | None) -> tuple[str, list[tuple[str | None, str, str]]]:
    """(kind, [(usage or None, raw path, target path with [classes])]) of the stats input."""
    from cellmap_data.utils.paths import split_target_path

    if os.path.isfile(source):
        from cellmap_data.datasplit import read_datasplit_csv

        try:
            split = read_datasplit_csv(source)
        except UnicodeDecodeError:
            raise UsageError(f"cellmap_data stats: error: {source}: not a text CSV file") from None
        except Exception as error:  # csv.Error and the like
            message = _first_line(error)
            if isinstance(error, (ValueError, OSError)) and source in message:
                raise
            raise UsageError(f"cellmap_data stats: error: {source}: malformed datasplit CSV ({message})") from None
        return "csv", [(usage, row["raw"], row["gt"]) for usage, rows in split.items() for row in rows]
    from cellmap_data.remote import groups_exist, is_url

    if "[" in source and not os.path.exists(source):
        template, _ = split_target_path(source)
        crop = template.split("{label}", 1)[0].rstrip("/" + os.sep)
        if not (groups_exist([crop])[0] if is_url(crop) else os.path.isdir(crop)):
            raise _not_found(crop)
        return "template", [(None, _raw_for(crop, raw, source), source)]
    if is_url(source):
        raise UsageError(f"cellmap_data stats: error: {source}: an object store is not listed; pass the crop as "
                         ".../crop/[class,...] (or a datasplit CSV whose rows are URLs)")
    if not os.path.exists(source):
        raise _not_found(source)
    node = _node(source)
    if node.kind != "group":
        raise _not_a_group(source) if node.kind is None else UsageError(
            f"cellmap_data stats: error: {source}: a zarr array, not a crop group, container or CSV")
    if node.is_image:
        raise UsageError(f"cellmap_data stats: error: {source}: an image group, not a label crop group; pass the "
                         f"crop folder, .../crop1/[class,...], a container or a datasplit CSV")
    classes = _child_images(source)
    if _looks_like_crop(node, classes):
        crops = [(node, classes)]
        kind = "crop"
    else:
        _, crops = _scan(source)
        kind = "container"
        if not crops:
            raise UsageError(f"cellmap_data stats: error: {source}: no label crop group (.../labels/.../crop/<class>) "
                             f"found within {MAX_SEARCH_DEPTH} levels")
    rows: list[tuple[str | None, str, str]] = []
    for group, images in crops:
        names = ",".join(os.path.basename(image.path) for image in images)
        rows.append((None, _raw_for(group.path, raw, source), f"{group.path}/[{names}]"))
    return kind, rows


def _default_scale(rows: Sequence[tuple[str | None, str, str]]) -> tuple[float, float, float] | None:
    from cellmap_data import _engine
    from cellmap_data.exceptions import CellMapError

    for raw in dict.fromkeys(raw for _, raw, _ in rows):
        try:
            voxel = _engine.Volume(raw).levels[0]["voxel_size"]
        except (CellMapError, OSError, ValueError, IndexError):
            continue
        return (float(voxel[0]), float(voxel[1]), float(voxel[2]))
    return None


def _display_table(df: Any, wide: bool, all_rows: bool) -> Any:
    import polars as pl

    view = df if all_rows else df.filter(pl.col("annotated"))
    if wide:
        return view
    datasets = short_names(view["dataset"].to_list()) if view.height else {}

    def triple(prefix: str, fmt: Callable[[Any], str]) -> list[str]:
        out = []
        for row in view.select([f"{prefix}_z", f"{prefix}_y", f"{prefix}_x"]).iter_rows():
            out.append("" if row[0] is None else fmt(row))
        return out

    columns: dict[str, Any] = {}
    if "split" in view.columns:
        columns["split"] = view["split"]
    columns["dataset"] = [datasets.get(d, d) for d in view["dataset"].to_list()]
    columns["crop"] = [os.path.basename(os.path.normpath(c)) for c in view["crop"].to_list()]
    columns["class"] = view["class"]
    if all_rows:
        columns["annotated"] = view["annotated"]
    columns["level"] = view["level"]
    columns["source"] = view["count_source"]
    columns["shape"] = triple("shape", _shape)
    columns["voxel_size"] = triple("voxel_size", lambda values: triple_text(values, ","))
    for name in ("foreground_voxels", "total_voxels"):
        columns[name] = _rounded_counts(view[name])
    columns["fraction"] = view["fraction"].round(4)
    columns["weight"] = view["weight"].round(2)
    return pl.DataFrame(columns)


def _rounded_counts(values: Any) -> Any:
    """Voxel counts as integers when they are whole (else to 2 decimals: a label voxel smaller
    than the training voxel along some axis counts fractionally)."""
    import polars as pl

    if values.len() == 0 or bool((values.round(0) == values).all()):
        return values.cast(pl.Int64)
    return values.round(2)


def _class_summary(df: Any) -> Any:
    """One row per class (per split for a datasplit): crops annotating it, crops with foreground,
    summed counts, the foreground fraction and the reference's weight background / max(fg, 1)."""
    import polars as pl

    keys = (["split"] if "split" in df.columns else []) + ["class"]
    fg, total = pl.col("foreground_voxels"), pl.col("total_voxels")
    summary = df.group_by(keys, maintain_order=True).agg(
        pl.col("annotated").sum().alias("crops_annotated"),
        (pl.col("annotated") & (fg > 0)).sum().alias("crops_with_foreground"),
        fg.sum().alias("foreground_voxels"),
        total.sum().alias("total_voxels"),
    )
    fg, total = pl.col("foreground_voxels"), pl.col("total_voxels")
    return summary.with_columns(
        pl.when(total > 0).then(fg / total).otherwise(None).alias("foreground_fraction"),
        pl.when(total > 0).then((total - fg).clip(lower_bound=0) / pl.max_horizontal(fg, pl.lit(1.0)))
        .otherwise(None).alias("weight"),
    )


def _summary_display(summary: Any) -> Any:
    import polars as pl

    return summary.with_columns(
        _rounded_counts(summary["foreground_voxels"]), _rounded_counts(summary["total_voxels"]),
        pl.col("foreground_fraction").round(4), pl.col("weight").round(2),
    )


def _write_table(df: Any, out: str) -> None:
    lower = out.lower()
    if lower.endswith(".parquet"):
        df.write_parquet(out)
    elif lower.endswith(".csv"):
        df.write_csv(out)
    else:
        raise UsageError(f"cellmap_data stats: error: --out {out}: expected a .parquet or .csv file name")


def cmd_stats(args: argparse.Namespace) -> int:
    """Print per-(crop, class) counts of a datasplit CSV, crop or container, and a per-class summary."""
    source = args.source
    if args.out is not None and not args.out.lower().endswith((".parquet", ".csv")):
        raise UsageError(f"cellmap_data stats: error: --out {args.out}: expected a .parquet or .csv file name")
    kind, rows = _stats_rows(source, args.raw)
    if not rows:
        raise UsageError(f"cellmap_data stats: error: {source}: no crops")

    from cellmap_data.utils.paths import split_target_path

    listed: dict[str, None] = {}
    for _, _, gt in rows:
        try:
            listed.update(dict.fromkeys(split_target_path(gt)[1]))
        except ValueError as error:
            raise UsageError(f"cellmap_data stats: error: {source}: {_first_line(error)}") from None
    classes = args.classes or list(listed)
    unknown = [c for c in classes if c not in listed]
    if unknown:
        raise UsageError(f"cellmap_data stats: error: {source}: no crop annotates class"
                         f"{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(classes listed: {', '.join(listed)})")
    scale = args.input_scale or _default_scale(rows) or (1.0, 1.0, 1.0)

    import polars as pl

    from cellmap_data import _stats
    from cellmap_data.dataset import CellMapDataset

    # One-voxel arrays at the training scale, padded: every crop yields statistics (what a
    # CellMapDataSplit with these arrays reports), whatever patch size training uses.
    array = {"shape": (1, 1, 1), "scale": scale}
    opened: list[tuple[str | None, Any]] = []
    skipped: list[str] = []
    for usage, raw, gt in _progress(rows, "opening crops", "crop"):
        try:
            dataset = CellMapDataset(raw, gt, classes, {"raw": array}, {"labels": array}, pad=True,
                                     force_has_data=True, is_train=False)
        except (FileNotFoundError, ValueError, OSError) as error:
            if len(rows) == 1:
                raise
            reason = _first_line(error)
            skipped.append(f"{gt}: {reason}")
            print(f"cellmap_data stats: warning: skipping {gt}: {reason}", file=sys.stderr)
            continue
        opened.append((usage, dataset))
    if not opened:
        raise UsageError(f"cellmap_data stats: error: {source}: no usable crop ({len(skipped)} skipped, "
                         "see the warnings above)")

    progress = sys.stderr.isatty()
    cache_dir = False if args.no_cache else None
    frames = []
    usages = ("train", "validate") if kind == "csv" else (None,)
    for usage in usages:
        datasets = [d for u, d in opened if u == usage]
        if datasets:
            frame = _stats.stats_for(datasets, progress=progress, cache_dir=cache_dir)
            frames.append(frame if usage is None else frame.with_columns(pl.lit(usage).alias("split")))
    df = pl.concat(frames)

    counted = ", ".join(f"{sum(1 for u, _ in opened if u == usage)} {usage}" for usage in usages if usage)
    n_datasets = len({d.raw_path for _, d in opened})
    print(f"{source}: {len(opened)} crop{'s' if len(opened) != 1 else ''}"
          f"{f' ({counted})' if counted else ''} of {n_datasets} dataset{'s' if n_datasets != 1 else ''}, "
          f"{len(classes)} class{'es' if len(classes) != 1 else ''}; counts in training voxels of "
          f"{triple_text(scale, 'x')} nm" + (f"; {len(skipped)} skipped" if skipped else ""))
    display = _display_table(df, args.wide, args.all_rows)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=10_000, fmt_str_lengths=500,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   tbl_formatting="ASCII_MARKDOWN"):
        print(display)
        hidden = df.height - display.height
        if hidden:
            print(f"({hidden} (crop, class) row{'s' if hidden != 1 else ''} of classes the crop does not annotate "
                  "not shown: --all-rows shows them)")
        print("\nper class:")
        print(_summary_display(_class_summary(df)))
    if args.out is not None:
        _write_table(df, args.out)
        print(f"wrote {df.height} rows x {df.width} columns to {args.out}")
    return 0


register(Subcommand(name="stats", help="class statistics (foreground counts, fractions, weights) of crops",
                    add_arguments=_add_stats_arguments, run=cmd_stats))
