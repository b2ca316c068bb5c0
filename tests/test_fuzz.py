"""Fuzzing the parsers the engine exposes (issue 18, item 6), with hypothesis.

Targets: OME-NGFF attributes (``.zattrs`` of zarr v2, the ``zarr.json`` attributes of v3) and
the zarr array metadata next to a valid small image, opened and read with
``cellmap_data._engine.Volume``; the spatial-transform config of ``CellMapDataset``; the
datasplit CSV reader; the chunk decode path (a valid array whose chunk file holds fuzzed
bytes, for zstd, blosc, gzip and raw chunks) and decompression bombs.

The property, per input: it works, or it raises a :class:`~cellmap_data.exceptions.CellMapError`
subclass (each is also the builtin a caller would catch) — never a panic (the base class
``CellMapError`` with "internal engine error", which is how a caught panic surfaces), never
another exception, never a hang (``EXAMPLE_TIMEOUT_S`` per input), and never more than
``RSS_CAP_MIB`` of peak resident memory above the memory in use before the input (measured per
input: ``VmHWM`` is reset through ``/proc/self/clear_refs`` before each input).

Each target runs in its own child process (``python tests/test_fuzz.py TARGET DIR``) so that an
abort (a failed allocation aborts a Rust program), a hang or a memory blow-up fails that target
with its last input instead of taking pytest down. The child also limits its address space to
``AS_HEADROOM_MIB`` above what it had mapped after warming up, so a runaway allocation fails
fast instead of swapping the machine. The last input is written to ``last-input.txt`` beside
the target's files and shown in the failure message.

Default runs are derandomized (the same inputs every run) and bounded to a few seconds per
target. A longer, random run of N examples per target (docs/testing.md)::

    CELLMAP_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

``CELLMAP_FUZZ_SEED=<int>`` makes such a run reproducible.
"""

from __future__ import annotations

import copy
import csv
import faulthandler
import io
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

RSS_CAP_MIB = 512
AS_HEADROOM_MIB = 2048
EXAMPLE_TIMEOUT_S = 30
BOMB_BYTES = 1 << 30  # what a decompression bomb expands to (twice the RSS cap)
PANIC_WORDS = ("internal engine error", "panicked", "PanicException")

#: Examples per target in the default (``make test``) run: a few seconds each.
DEFAULT_EXAMPLES = {
    "ngff_attributes": 300,
    "array_metadata": 300,
    "spatial_transforms": 150,
    "datasplit_csv": 200,
    "chunk": 200,
}
LONG_EXAMPLES = int(os.environ.get("CELLMAP_FUZZ_EXAMPLES", "0") or 0)
FUZZ_SEED = os.environ.get("CELLMAP_FUZZ_SEED")
#: Record failing inputs and go on (no shrinking) to collect every kind of failure of a long
#: run; the target still fails at the end, listing them.
KEEP_GOING = os.environ.get("CELLMAP_FUZZ_KEEP_GOING", "") not in ("", "0")
#: Wall-clock limit of one target's child process (its examples, set-up and start-up).
TARGET_TIMEOUT_S = 240 + 0.1 * LONG_EXAMPLES
ROOT = Path(__file__).resolve().parent.parent

#: Lines of a failed child's output shown first.
KEY_WORDS = ("panicked at", "memory allocation of", "AssertionError:", "Timeout (", "Error:")
CHUNK_CODECS = ["zstd", "blosc", "gzip", "raw"]
BOMBS = ["zstd", "zstd-unsized", "gzip", "blosc"]


# == the parent side: one child process per target ==============================================


def run_target(target: str, workdir: Path) -> dict:
    """Runs ``target`` in a child process and returns its summary; fails with the child's
    output and last input when it fails, aborts or hangs."""
    workdir.mkdir(parents=True, exist_ok=True)
    last = workdir / "last-input.txt"
    env = {**os.environ, "CELLMAP_NUM_THREADS": "2"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, target, str(workdir)],
            capture_output=True, text=True, timeout=TARGET_TIMEOUT_S, env=env, cwd=ROOT,
        )
    except subprocess.TimeoutExpired as e:
        out = "".join(v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for v in (e.stdout, e.stderr))
        pytest.fail(f"{target}: no result within {TARGET_TIMEOUT_S:.0f} s (a hang?)\nlast input:\n"
                    f"{last.read_text(errors='replace') if last.exists() else '?'}\n--- output ---\n{out[-6000:]}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        key = [line for line in output.splitlines() if any(w in line for w in KEY_WORDS)]
        pytest.fail(f"{target}: the fuzz child failed ({how})\n" + "\n".join(dict.fromkeys(key[:12])) + "\nlast input:\n"
                    f"{last.read_text(errors='replace')[:4000] if last.exists() else '?'}\n--- output ---\n{output[-12000:]}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith("FUZZ-SUMMARY ")]
    assert summary, f"{target}: no summary from the child\n{output[-4000:]}"
    result = json.loads(summary[-1][len("FUZZ-SUMMARY "):])
    print(f"{target}: {result}")
    assert result["examples"] > 0
    return result


def _limit(seconds: float):
    return pytest.mark.timeout(seconds + 60, method="thread")


@_limit(TARGET_TIMEOUT_S)
def test_fuzzed_ngff_attributes_open_or_raise_cellmap_errors(tmp_path):
    run_target("ngff_attributes", tmp_path)


@_limit(TARGET_TIMEOUT_S)
def test_fuzzed_zarr_array_metadata_opens_or_raises_cellmap_errors(tmp_path):
    run_target("array_metadata", tmp_path)


@_limit(TARGET_TIMEOUT_S)
def test_fuzzed_spatial_transform_configs_build_or_raise_cellmap_errors(tmp_path):
    run_target("spatial_transforms", tmp_path)


@_limit(TARGET_TIMEOUT_S)
def test_fuzzed_datasplit_csv_parses_or_raises_cellmap_errors(tmp_path):
    run_target("datasplit_csv", tmp_path)


@_limit(TARGET_TIMEOUT_S)
@pytest.mark.parametrize("codec", CHUNK_CODECS)
def test_fuzzed_chunk_bytes_decode_or_raise_cellmap_errors(tmp_path, codec):
    run_target(f"chunk:{codec}", tmp_path)


@_limit(TARGET_TIMEOUT_S)
@pytest.mark.parametrize("bomb", BOMBS)
def test_decompression_bomb_in_a_chunk_stays_under_the_memory_cap(tmp_path, bomb):
    """A chunk of a few kB that decompresses to 1 GiB (twice the cap) where 1 kB is expected:
    the read must fail (ChunkDecodeError) without ever holding more than the cap."""
    result = run_target(f"bomb:{bomb}", tmp_path)
    assert result["outcomes"] == {"ChunkDecodeError": 1}, result


# == the child side ===============================================================================


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, VmSize of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "VmSize"):
                out[key] = int(line.split()[1]) * 1024
    return out


class Harness:
    """Runs each input under the property: outcome classification, the per-input watchdog,
    the peak-RSS check and the last-input file."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.target = target
        self.workdir = workdir
        self.last = workdir / "last-input.txt"
        self.outcomes: Counter[str] = Counter()
        self.max_growth = 0
        self.can_reset_peak = True
        self.failures: dict[str, str] = {}  # first line of each kind of failure → its first input

    def _reset_peak(self) -> None:
        if self.can_reset_peak:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.can_reset_peak = False

    def limit_address_space(self) -> None:
        """Address space: what is mapped now plus ``AS_HEADROOM_MIB`` (a safety net)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = _status()["VmSize"] + AS_HEADROOM_MIB * 2**20
        if hard == resource.RLIM_INFINITY or want < hard:
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))

    def check(self, description: Callable[[], str], run: Callable[[], object]) -> str:
        """Runs ``run`` for one input described by ``description()`` and checks the property
        (with ``CELLMAP_FUZZ_KEEP_GOING``, records a failure instead of raising it)."""
        if not KEEP_GOING:
            return self._check(description, run)
        try:
            return self._check(description, run)
        except AssertionError as e:
            first = str(e).splitlines()[0]
            key = first.split(" (")[0] if first.startswith("peak resident") else first
            self.failures.setdefault(key[:300], str(e)[:3000])
            self.outcomes["FAILED"] += 1
            return "FAILED"

    def _check(self, description: Callable[[], str], run: Callable[[], object]) -> str:
        text = description()
        self.last.write_text(text[:20000], errors="replace")
        self._reset_peak()
        before = _status()
        start_peak = before["VmRSS"] if self.can_reset_peak else before["VmHWM"]
        faulthandler.dump_traceback_later(EXAMPLE_TIMEOUT_S, exit=True)
        try:
            run()
            outcome = "ok"
        except BaseException as e:
            from cellmap_data.exceptions import CellMapError

            message = str(e)
            if isinstance(e, CellMapError) and type(e) is not CellMapError and not any(w in message for w in PANIC_WORDS):
                outcome = type(e).__name__
            elif isinstance(e, CellMapError):
                raise AssertionError(f"the engine panicked ({type(e).__name__}: {message})\ninput: {text[:2000]}") from e
            elif isinstance(e, AssertionError):
                raise
            else:
                raise AssertionError(
                    f"raised {type(e).__module__}.{type(e).__name__}, not a CellMapError: {message[:500]}\ninput: {text[:2000]}"
                ) from e
        finally:
            faulthandler.cancel_dump_traceback_later()
        growth = _status()["VmHWM"] - start_peak
        self.max_growth = max(self.max_growth, growth)
        assert growth <= RSS_CAP_MIB * 2**20, (
            f"peak resident memory grew by {growth / 2**20:.0f} MiB (cap {RSS_CAP_MIB} MiB; outcome {outcome})\n"
            f"input: {text[:2000]}"
        )
        self.outcomes[outcome] += 1
        return outcome

    def summary(self) -> dict:
        return {
            "examples": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "max_peak_growth_mib": round(self.max_growth / 2**20, 1),
            "rss_cap_mib": RSS_CAP_MIB,
            "peak_measured_per_input": self.can_reset_peak,
            **({"failures": list(self.failures.values())} if self.failures else {}),
        }


def fuzz_settings(kind: str):
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=LONG_EXAMPLES or DEFAULT_EXAMPLES[kind],
        deadline=timedelta(seconds=10),
        derandomize=not LONG_EXAMPLES and FUZZ_SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def seeded(test):
    if FUZZ_SEED is not None:
        from hypothesis import seed

        return seed(int(FUZZ_SEED))(test)
    return test


# -- strategies shared by the metadata targets ----------------------------------------------------


def _strategies():
    from hypothesis import strategies as st

    return st


INTERESTING_NUMBERS = [
    0, -0.0, 1, -1, 2, 3, 7, 8, 9, 16, 17, 0.5, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, -1e300,
    4096, 2**20, 2**24, 2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30,
]
INTERESTING_STRINGS = [
    "", ".", "..", "/", "s0", "s1", "s2", "s0/", "/s0", "./s0", "../s0", "s0/../s1", "s0/.zarray", "c", "c/0",
    "\x00", "é", "a" * 300, "0.4", "0.5", "0.6", "z", "y", "x", "c", "t", "Z", "space", "channel", "time",
    "nanometer", "micrometer", "angstrom", "scale", "translation", "identity", "ome", "multiscales",
]
INTERESTING_LISTS = [
    [], [1, 1, 1], [0, 0, 0], [-1, -1, -1], [1e300] * 3, [5e-324] * 3, [1, 1], [1, 1, 1, 1], [8, 8, 8],
    [16, 16, 16], [4096] * 3, [2**20] * 3, [2**40] * 3, [2**63] * 3, [1, 2**62, 2**62], [0.5, 0.5, 0.5],
    ["1", "1", "1"], [None, None, None], [1, 16, 16, 16],
]
#: Number spellings that JSON parsers disagree on (or that overflow a float).
NUMBER_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-999", b"-0", b"00", b"1.", b".5", b"0x10",
                 b"18446744073709551616", b"-9223372036854775809", b"1" * 400]
KNOWN_KEYS = [
    "multiscales", "ome", "version", "axes", "datasets", "path", "coordinateTransformations", "type",
    "scale", "translation", "name", "unit", "attributes", "zarr_format", "node_type", "shape", "chunks",
    "dtype", "fill_value", "order", "filters", "compressor", "dimension_separator", "id", "level",
    "data_type", "chunk_grid", "chunk_key_encoding", "configuration", "chunk_shape", "codecs", "separator",
    "storage_transformers", "dimension_names", "cellmap", "annotation", "complement_counts",
]
DTYPES = [
    "<u2", "|u1", "|i1", "<f4", ">f8", "<f8", "|b1", "<i8", ">u4", "<c8", "|S4", "<U3", "|O", "|V2",
    "<M8[ns]", "<f2", "bool", "uint8", "uint16", "float32", "int64", "complex64", "r16", "string", "float16",
]
CODECS = [
    None, {"id": "zstd", "level": 99}, {"id": "zstd", "level": -(2**31)}, {"id": "blosc", "cname": "nope"},
    {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}, {"id": "gzip", "level": -1},
    {"id": "zlib", "level": 1}, {"id": "bz2"}, {"id": "lzma"}, {"id": "no-such-codec"}, {"id": "delta", "dtype": "<u2"},
    [{"name": "bytes", "configuration": {"endian": "big"}}],
    [{"name": "transpose", "configuration": {"order": [2, 1, 0]}}, {"name": "bytes"}],
    [{"name": "sharding_indexed", "configuration": {"chunk_shape": [4096, 4096, 4096], "codecs": [{"name": "bytes"}],
                                                   "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}]}}],
    [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}}],
    [{"name": "bytes"}, {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": "shuffle",
                                                            "typesize": 1, "blocksize": 0}}],
]


def json_values(extra=()):
    st = _strategies()
    scalars = (
        st.none() | st.booleans() | st.integers(-(2**65), 2**65)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
        | st.sampled_from(INTERESTING_NUMBERS + INTERESTING_STRINGS + list(extra))
        | st.sampled_from(INTERESTING_LISTS).map(copy.deepcopy)
    )
    keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)
    return st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(keys, c, max_size=5), max_leaves=12)


def mutated_json(doc, extra=()):
    """``doc`` with one to four mutations, each at a random depth: a node replaced by any JSON
    value (often an interesting one), a key or element dropped, added or duplicated, a node
    wrapped in a list or dict."""
    st = _strategies()
    values = json_values(extra)
    keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)

    def mutate(draw, node):
        if isinstance(node, (dict, list)) and node and draw(st.integers(0, 4)) > 0:
            key = draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
            node[key] = mutate(draw, node[key])
            return node
        op = draw(st.sampled_from(["value", "number", "number", "drop", "add", "duplicate", "wrap"]))
        if op == "number":
            return draw(st.sampled_from(INTERESTING_NUMBERS))
        if op == "drop" and isinstance(node, dict) and node:
            del node[draw(st.sampled_from(sorted(node)))]
        elif op == "drop" and isinstance(node, list) and node:
            del node[draw(st.integers(0, len(node) - 1))]
        elif op == "add" and isinstance(node, dict):
            node[draw(keys)] = draw(values)
        elif op == "add" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(values))
        elif op == "duplicate" and isinstance(node, list) and node:
            node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
        elif op == "wrap":
            return draw(st.sampled_from([[node], {"value": node}]))
        else:
            return draw(values)
        return node

    @st.composite
    def strategy(draw):
        out = copy.deepcopy(doc)
        for _ in range(draw(st.integers(1, 4))):
            out = mutate(draw, out)
        return out

    return strategy()


def file_contents(doc, extra=()):
    """Bytes of a metadata file: the mutated document (most often), any JSON value, the valid
    text cut short or with bytes spliced in, or arbitrary bytes."""
    st = _strategies()
    text = json.dumps(doc, indent=2).encode()

    def splice(args):
        at, junk, cut = args
        at = min(at, len(text))
        return text[:at] + junk + (text[at:] if not cut else b"")

    numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?", text)]

    def replace_number(args):
        i, token = args
        lo, hi = numbers[i % len(numbers)]
        return text[:lo] + token + text[hi:]

    return st.one_of(
        st.tuples(st.integers(0, 10**6), st.sampled_from(NUMBER_TOKENS)).map(replace_number),
        mutated_json(doc, extra).map(lambda d: json.dumps(d).encode()),
        mutated_json(doc, extra).map(lambda d: json.dumps(d).encode()),
        mutated_json(doc, extra).map(lambda d: json.dumps(d).encode()),
        json_values(extra).map(lambda d: json.dumps(d).encode()),
        st.tuples(st.integers(0, len(text)), st.binary(max_size=8), st.booleans()).map(splice),
        st.binary(max_size=300),
    )


def structured_metadata(kind: str, fmt: int):
    """Well-formed documents with extreme values (reaching past the JSON checks): for
    ``ngff_attributes`` the image's multiscales (axes, levels, scales, translations), for
    ``array_metadata`` level s0's array metadata (shape, chunks, dtype, fill value, codecs)."""
    st = _strategies()
    number = st.sampled_from(INTERESTING_NUMBERS) | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    size = st.sampled_from([0, 1, 2, 7, 8, 9, 16, 17, 4096, 2**20, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64]) | st.integers(0, 64)
    triple = lambda s: st.lists(s, min_size=3, max_size=3) | st.lists(s, min_size=0, max_size=5)  # noqa: E731
    # Mostly valid fields (the valid value twice as often as any other choice), so that the
    # extreme ones reach the reads.
    usual = lambda value, other: st.one_of(st.just(value), st.just(value), other)  # noqa: E731
    three = st.lists(number, min_size=3, max_size=3)
    if kind == "ngff_attributes":
        axis = st.fixed_dictionaries(
            {"name": st.sampled_from(["z", "y", "x", "c", "t", ""])},
            optional={"type": st.sampled_from(["space", "channel", "time", "", None]),
                      "unit": st.sampled_from(["nanometer", "micrometer", "", None, 1])},
        )
        zyx = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
        axes = usual(zyx, st.lists(axis, max_size=5) | st.just([{"name": "c", "type": "channel"}] + zyx))
        transform_lists = st.tuples(usual([1.0, 1.0, 1.0], three | triple(number)),
                                    usual([0.0, 0.0, 0.0], three | triple(number))).map(
            lambda st_: [{"type": "scale", "scale": st_[0]}, {"type": "translation", "translation": st_[1]}])
        odd_transform = st.one_of(
            st.fixed_dictionaries({"type": st.just("scale"), "scale": triple(number)}),
            st.fixed_dictionaries({"type": st.just("translation"), "translation": triple(number)}),
            st.fixed_dictionaries({"type": st.sampled_from(["identity", "path", "affine", "rotation"])}),
        )
        dataset = st.fixed_dictionaries({
            "path": usual("s0", st.sampled_from(["s1", "s0/", "/s0", "./s0", "..", "../raw/s0", "s2", "", "s0/../s1"])),
            "coordinateTransformations": usual(None, st.lists(odd_transform, max_size=3)),
        }).flatmap(lambda d: transform_lists.map(lambda t: {**d, "coordinateTransformations": t})
                   if d["coordinateTransformations"] is None else st.just(d))
        datasets = st.one_of(st.lists(dataset, min_size=1, max_size=2), st.lists(dataset, max_size=4))
        multiscale = st.fixed_dictionaries(
            {"axes": axes, "datasets": datasets},
            optional={"version": st.sampled_from(["0.4", "0.5", "0.3", "0.6", ""]), "name": st.text(max_size=4),
                      "coordinateTransformations": st.lists(odd_transform, max_size=2)},
        )
        multiscales = usual(1, st.integers(0, 2)).flatmap(lambda n: st.lists(multiscale, min_size=n, max_size=n))
        if fmt == 2:
            return multiscales.map(lambda m: {"multiscales": m})
        return multiscales.map(lambda m: {"attributes": {"ome": {"version": "0.5", "multiscales": m}},
                                          "zarr_format": 3, "node_type": "group"})
    three = st.lists(size, min_size=3, max_size=3)
    shape = usual([16, 16, 16], three | triple(size))
    chunks = usual([8, 8, 8], three | three | triple(size))
    fill = usual(0, st.sampled_from([1, -1, None, "NaN", "Infinity", 1e300, 2**64, "abc", True, 0.5, [0]]))
    if fmt == 2:
        return st.fixed_dictionaries({
            "zarr_format": st.just(2), "shape": shape, "chunks": chunks, "dtype": usual("|u1", st.sampled_from(DTYPES)),
            "fill_value": fill, "order": usual("C", st.sampled_from(["F", "X"])),
            "filters": usual(None, st.sampled_from([[], [{"id": "delta", "dtype": "<u2"}]])),
            "dimension_separator": usual(".", st.sampled_from(["/", "-"])),
            "compressor": usual({"id": "zstd", "level": 6}, st.sampled_from([c for c in CODECS if not isinstance(c, list)])),
        })
    v3_types = ["uint16", "int8", "float32", "float64", "bool", "complex64", "r16", "string", "uint64", "float16"]
    return st.fixed_dictionaries({
        "zarr_format": st.just(3), "node_type": st.just("array"), "shape": shape,
        "data_type": usual("uint8", st.sampled_from(v3_types)),
        "chunk_grid": st.fixed_dictionaries({"name": usual("regular", st.just("rectilinear")),
                                             "configuration": st.fixed_dictionaries({"chunk_shape": chunks})}),
        "chunk_key_encoding": usual({"name": "default", "configuration": {"separator": "/"}},
                                    st.just({"name": "v2", "configuration": {"separator": "."}})),
        "fill_value": fill,
        "codecs": usual([{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 0, "checksum": False}}],
                        st.sampled_from([c for c in CODECS if isinstance(c, list)])),
        "attributes": st.just({}),
    })


# -- the volume targets ------------------------------------------------------------------------------


def small_image(path: Path, zarr_format: int) -> Path:
    """A two-level 16^3 / 8^3 uint8 image (chunks 8^3) written with zarr-python."""
    import numpy as np
    from conftest import write_ome_image

    data = np.arange(16**3, dtype=np.uint16).reshape(16, 16, 16).astype(np.uint8)
    return write_ome_image(path, [data, data[::2, ::2, ::2].copy()], [(1, 1, 1), (2, 2, 2)],
                           [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0)], zarr_format=zarr_format, chunks=(8, 8, 8))


def open_and_read(path: Path) -> None:
    """Opens the image with the engine and reads a few patches: on each level's own grid at its
    centre and far corner, and on a 1 nm grid at (8, 8, 8) nm."""
    import math

    from cellmap_data import _engine

    volume = _engine.Volume(str(path))
    _ = (volume.axes, volume.ngff_version, volume.path)
    levels = volume.levels
    volume.pick_level([1.0, 1.0, 1.0])
    for index, level in enumerate(levels[:3]):
        voxel = [float(v) for v in level["voxel_size"]]
        lo, hi = level["world_box"]
        if not all(math.isfinite(v) and v > 0 for v in voxel):
            voxel = [1.0, 1.0, 1.0]
        centres = []
        if all(math.isfinite(v) for v in lo + hi):
            centres = [[(a + b) / 2 for a, b in zip(lo, hi)], [b - 2 * v for b, v in zip(hi, voxel)]]
        for c in centres:
            volume.read(c, [4, 4, 4], voxel, level=index)
    volume.read([8.0, 8.0, 8.0], [4, 4, 4], [1.0, 1.0, 1.0])


def _volume_target(harness: Harness, kind: str) -> list[Callable[[], None]]:
    from hypothesis import example, given
    from hypothesis import strategies as st

    images = {fmt: small_image(harness.workdir / f"v{fmt}.zarr" / "raw", fmt) for fmt in (2, 3)}
    open_and_read(images[2])  # warm-up: engine pool and cache exist before the limits
    open_and_read(images[3])
    if kind == "ngff_attributes":
        files = {2: images[2] / ".zattrs", 3: images[3] / "zarr.json"}
        extra: tuple = ()
    else:
        files = {2: images[2] / "s0" / ".zarray", 3: images[3] / "s0" / "zarr.json"}
        extra = tuple(DTYPES) + tuple(CODECS)
    originals = {fmt: f.read_bytes() for fmt, f in files.items()}
    docs = {fmt: json.loads(b) for fmt, b in originals.items()}
    structured = [st.tuples(st.just(fmt), structured_metadata(kind, fmt).map(lambda d: json.dumps(d).encode())) for fmt in (2, 3)]
    cases = st.one_of(*[st.tuples(st.just(fmt), file_contents(docs[fmt], extra)) for fmt in (2, 3)], *structured * 3)
    if kind == "ngff_attributes":  # v3: the attributes alone too, inside a valid group document
        attrs = docs[3]["attributes"]
        cases = cases | mutated_json(attrs).map(lambda a: (3, json.dumps({**docs[3], "attributes": a}).encode()))

    @given(case=cases)
    def fuzz(case):
        fmt, content = case
        target = files[fmt]
        target.write_bytes(content)
        try:
            harness.check(lambda: f"{target}:\n{content.decode(errors='backslashreplace')}", lambda: open_and_read(images[fmt]))
        finally:
            target.write_bytes(originals[fmt])

    for fmt, edit in CORPUS.get(kind, []):
        fuzz = example(case=(fmt, json.dumps(edit(copy.deepcopy(docs[fmt]))).encode()))(fuzz)
    return [fuzz_settings(kind)(seeded(fuzz))]


def _set(doc, path, value):
    """``doc`` with the item at ``path`` (a tuple of keys) set to ``value``."""
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


#: Inputs that found bugs, run first in every run (hypothesis ``@example``s): edits of the
#: valid document of each zarr format.
CORPUS = {
    "ngff_attributes": [
        # Found by a random run: a translation of -2^63 nm overflows the voxel arithmetic of a read.
        (2, lambda d: {"multiscales": [{**d["multiscales"][0], "datasets": [
            {"path": "s0", "coordinateTransformations": [{"type": "translation", "translation": [0, 0, -9.223372036854776e18]}]}]}]}),
        # Found by a random run: huge scales and translations overflow a negation in the read.
        (3, lambda d: _set(d, ("attributes", "ome", "multiscales", 0, "datasets"), [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.26e249, 0.5, 4611686018427387904]},
            {"type": "translation", "translation": [3, 2.169e254, -6.07e-88]}]}])),
        # Found by a random run: a voxel size of 1e-38 nm (a 4 nm patch spans 10^38 voxels).
        (2, lambda d: {"multiscales": [{**d["multiscales"][0], "datasets": [
            {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1.1754943508222875e-38]},
                                                         {"type": "translation", "translation": [0.0, 0.0, 0.0]}]}]}]}),
    ],
    "array_metadata": [
        # Chunks of 64 GiB whose chunk files are absent (the keys use another separator than
        # the files on disk): a read must not allocate a whole fill-value chunk.
        (2, lambda d: {**d, "chunks": [4096, 4096, 4096], "dimension_separator": "/"}),
        (3, lambda d: _set(_set(d, ("chunk_grid", "configuration", "chunk_shape"), [4096, 4096, 4096]),
                           ("chunk_key_encoding",), {"name": "v2", "configuration": {"separator": "."}})),
        # Found by a random run: a fill-value chunk of 2^53 bytes.
        (2, lambda d: {**d, "chunks": [2, 1048576, 4294967296]}),
        # Found by a random run: a 654 MB chunk of a 2^40-voxel array, chunk file absent.
        (2, lambda d: {**d, "shape": [1099511627776, 39, 16], "chunks": [1048576, 39, 16], "order": "F"}),
        # Found by a random run: a 208 MiB chunk for a 16³ array.
        (3, lambda d: _set(_set(d, ("chunk_grid", "configuration", "chunk_shape"), [4096, 4096, 13]),
                           ("chunk_key_encoding",), {"name": "v2", "configuration": {"separator": "."}})),
    ],
}


# -- spatial transforms -----------------------------------------------------------------------------


def _spatial_target(harness: Harness) -> list[Callable[[], None]]:
    import numpy as np
    from hypothesis import given
    from hypothesis import strategies as st

    from cellmap_data import CellMapDataset
    from cellmap_data.tools.synthetic import make_synthetic_data

    data = make_synthetic_data(harness.workdir / "data", size="tiny", n_datasets=1, seed=0, write_counts=False)
    d = data.datasets[0]
    crop = d.crops[0]
    arrays = dict(input_arrays={"in": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                  target_arrays={"out": {"shape": (8, 8, 8), "scale": (8, 8, 8)}})

    def build_and_read(config, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = CellMapDataset(str(d.raw_path), crop.target_path, ["mito"], spatial_transforms=config,
                                pad=True, seed=seed, **arrays)
            ds.get_batch([0, len(ds) - 1])

    build_and_read({"mirror": {"x": 0.5}, "rotate": {"z": [-30, 30]}, "transpose": ["x", "y"]}, 0)  # warm-up

    axis = st.sampled_from(["z", "y", "x", "c", "t", "", "X", "zy"]) | st.text(max_size=3)
    number = (
        st.integers(-(10**6), 10**6) | st.floats() | st.sampled_from(INTERESTING_NUMBERS) | st.booleans()
        | st.integers(-(2**70), 2**70) | st.floats(width=32).map(np.float32) | st.integers(-5, 5).map(np.int64)
        | st.sampled_from([10**400, -(10**400), 2**1024])  # integers no float can hold
    )
    angle_range = st.lists(number, min_size=0, max_size=3) | st.tuples(number, number) | number
    anything = json_values()
    per_axis = st.dictionaries(axis, number | angle_range | anything, max_size=4)
    nested = lambda s: st.fixed_dictionaries({"axes": s})  # noqa: E731
    mirror = st.booleans() | st.dictionaries(axis, number, max_size=4) | nested(st.dictionaries(axis, number, max_size=4)) | per_axis | anything
    transpose = st.booleans() | st.lists(axis, max_size=4) | nested(st.lists(axis, max_size=4) | st.tuples(axis, axis)) | anything
    rotate = st.dictionaries(axis, angle_range, max_size=4) | nested(st.dictionaries(axis, angle_range, max_size=4)) | per_axis | anything
    known = st.fixed_dictionaries({}, optional={"mirror": mirror, "transpose": transpose, "rotate": rotate})
    unknown = st.dictionaries(st.sampled_from(["shear", "scale", "axes", "Mirror", "elastic", "rotation"]) | st.text(max_size=6),
                              anything, max_size=2)
    configs = st.one_of(
        st.tuples(known, unknown).map(lambda kv: {**kv[1], **kv[0]}),
        known, known,
        st.dictionaries(st.text(max_size=8), anything, max_size=3),
        anything,
    )

    @fuzz_settings("spatial_transforms")
    @seeded
    @given(config=configs, seed=st.integers(0, 2**64 - 1))
    def fuzz(config, seed):
        harness.check(lambda: f"spatial_transforms={config!r}, seed={seed}", lambda: build_and_read(config, seed))

    return [fuzz]


# -- the datasplit CSV ------------------------------------------------------------------------------


def _csv_target(harness: Harness) -> list[Callable[[], None]]:
    from hypothesis import given
    from hypothesis import strategies as st

    from cellmap_data.datasplit import read_datasplit_csv

    path = harness.workdir / "datasplit.csv"
    field = st.sampled_from([
        "train", "validate", "val", "validation", "TRAIN", " train ", "#", "# comment", "", " ", "a/b.zarr",
        "recon-1/em/fibsem-uint8", "/abs/c.zarr", "x,y", '"', 'a"b', "é", "\x00", "\r", "\n", "\ufeff",
    ]) | st.text(max_size=12)
    rows = st.lists(st.lists(field, max_size=7), max_size=6)

    def to_csv(args):
        table, quoting, terminator = args
        out = io.StringIO()
        csv.writer(out, quoting=quoting, lineterminator=terminator).writerows(table)
        return out.getvalue()

    texts = st.one_of(
        st.tuples(rows, st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
                  st.sampled_from(["\n", "\r\n", "\r"])).map(to_csv),
        st.text(alphabet=st.sampled_from(list(',"\n\r# \t\x00abtrainvlde/') + ["é", "\ufeff"]), max_size=200),
        st.text(max_size=200),
    )
    encoded = st.one_of(
        texts.map(lambda t: t.encode("utf-8", errors="surrogatepass")),
        st.tuples(texts, st.sampled_from(["utf-16", "latin-1", "utf-8-sig"])).map(lambda a: a[0].encode(a[1], errors="replace")),
        st.binary(max_size=300),
        st.integers(131_000, 140_000).map(lambda n: ("train," + "a" * n + ",b\n").encode()),
    )

    def check_result(result):
        assert set(result) == {"train", "validate"}, result
        assert result["train"] or result["validate"]
        for rows_ in result.values():
            for row in rows_:
                assert set(row) == {"raw", "gt"} and all(isinstance(v, str) for v in row.values()), row

    @fuzz_settings("datasplit_csv")
    @seeded
    @given(content=encoded)
    def fuzz(content):
        path.write_bytes(content)
        harness.check(lambda: f"datasplit CSV bytes: {content[:4000]!r}", lambda: check_result(read_datasplit_csv(path)))

    # Round trip: rows written by the csv module (any quoting) read back as written.
    plain = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10).map(str.strip)
    split_rows = st.lists(st.tuples(st.sampled_from(["train", "validate"]), plain, plain, plain, plain), min_size=1, max_size=5)

    @fuzz_settings("datasplit_csv")
    @seeded
    @given(table=split_rows, quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]), terminator=st.sampled_from(["\n", "\r\n"]))
    def round_trip(table, quoting, terminator):
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=quoting, lineterminator=terminator).writerows(table)

        def run():
            result = read_datasplit_csv(path)
            want = {"train": [], "validate": []}
            for usage, rc, rd, gc, gd in table:
                want[usage].append({"raw": os.path.join(rc, rd), "gt": os.path.join(gc, gd)})
            assert result == want, (result, want)

        harness.check(lambda: f"rows {table!r}, quoting {quoting}, terminator {terminator!r}", run)

    return [fuzz, round_trip]


# -- chunk bytes ------------------------------------------------------------------------------------


def chunk_image(path: Path, codec: str) -> Path:
    """An 8^3 uint16 image of one chunk (zarr v2, ``codec``) written with zarr-python; returns
    the chunk file."""
    import numpy as np
    import zarr
    from numcodecs import GZip, Blosc, Zstd

    compressor = {"zstd": Zstd(level=3), "blosc": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
                  "gzip": GZip(level=1), "raw": None}[codec]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("s0", shape=(8, 8, 8), chunks=(8, 8, 8), dtype="uint16", fill_value=0,
                               compressors=[compressor] if compressor else None)
    array[...] = np.arange(512, dtype=np.uint16).reshape(8, 8, 8) * 97
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
    }]
    return path / "s0" / "0.0.0"


def read_chunk_image(path: Path):
    import numpy as np

    from cellmap_data import _engine

    volume = _engine.Volume(str(path))
    return np.from_dlpack(volume.read([4.0, 4.0, 4.0], [8, 8, 8], [1.0, 1.0, 1.0]))


U32 = [0, 1, 2, 16, 255, 1023, 1024, 1025, 2**16, 2**30, 0x7FFFFFEF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutated_bytes(valid: bytes):
    st = _strategies()

    @st.composite
    def strategy(draw):
        b = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "truncate", "insert", "u32", "u64", "zeros", "extend"]))
            at = draw(st.integers(0, max(len(b), 1))) % max(len(b), 1)
            if op == "flip" and b:
                b[at] ^= draw(st.integers(1, 255))
            elif op == "truncate":
                del b[at:]
            elif op == "insert":
                b[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif op in ("u32", "u64"):
                off = draw(st.integers(0, 40))
                value = draw(st.sampled_from(U32) | st.integers(0, 2**32 - 1))
                packed = struct.pack("<I", value) if op == "u32" else struct.pack("<Q", value * draw(st.sampled_from([1, 2**16, 2**32])))
                if off + len(packed) <= len(b):
                    b[off:off + len(packed)] = packed
            elif op == "zeros":
                n = draw(st.integers(1, 64))
                b[at:at + n] = bytes(len(b[at:at + n]))
            elif op == "extend":
                b += draw(st.binary(max_size=64))
        return bytes(b)

    return strategy()


def _chunk_target(harness: Harness, codec: str) -> list[Callable[[], None]]:
    import numpy as np
    from hypothesis import given
    from hypothesis import strategies as st

    image = harness.workdir / f"{codec}.zarr" / "raw"
    chunk = chunk_image(image, codec)
    valid = chunk.read_bytes()
    expect = read_chunk_image(image)
    assert (expect == np.arange(512).reshape(8, 8, 8) * 97).all()
    contents = st.one_of(st.just(valid), mutated_bytes(valid), mutated_bytes(valid), st.binary(max_size=2048),
                         st.binary(max_size=64).map(lambda junk: valid[:16] + junk))

    @fuzz_settings("chunk")
    @seeded
    @given(content=contents)
    def fuzz(content):
        chunk.write_bytes(content)

        def run():
            values = read_chunk_image(image)
            if codec == "raw" and len(content) == 1024:  # raw bytes of 512 little-endian uint16
                np.testing.assert_array_equal(values, np.frombuffer(content, "<u2").reshape(8, 8, 8).astype(values.dtype))
            if content == valid:
                np.testing.assert_array_equal(values, expect)

        harness.check(lambda: f"{codec} chunk ({len(content)} bytes): {content[:3000].hex()}", run)

    return [fuzz]


# -- decompression bombs ----------------------------------------------------------------------------


def zstd_rle_frame(total: int, sized: bool) -> bytes:
    """A zstd frame of ``total`` zero bytes made of RLE blocks (4 bytes per 128 KiB), with the
    content size in the header or without it (a streamed frame)."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0xE0]) + struct.pack("<Q", total) if sized else bytes([0x00, 0x38])  # single segment | window 128 KiB
    block = 1 << 17
    n = total // block
    for i in range(n):
        out += struct.pack("<I", (1 if i == n - 1 else 0) | (1 << 1) | (block << 3))[:3] + b"\x00"
    return bytes(out)


def bomb_bytes(kind: str) -> bytes:
    if kind in ("zstd", "zstd-unsized"):
        return zstd_rle_frame(BOMB_BYTES, sized=kind == "zstd")
    if kind == "gzip":
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        zeros = bytes(1 << 20)
        parts = [compressor.compress(zeros) for _ in range(BOMB_BYTES >> 20)]
        return b"".join(parts) + compressor.flush()
    if kind == "blosc":
        import numpy as np
        from numcodecs import Blosc

        zeros = np.zeros(BOMB_BYTES, np.uint8)
        return bytes(Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE).encode(zeros))
    raise ValueError(kind)


def _bomb_target(harness: Harness, kind: str) -> list[Callable[[], None]]:
    image = harness.workdir / "bomb.zarr" / "raw"
    chunk = chunk_image(image, kind.split("-")[0])
    read_chunk_image(image)  # warm-up
    bomb = bomb_bytes(kind)

    def run_once():
        chunk.write_bytes(bomb)
        harness.check(lambda: f"{kind} bomb: {len(bomb)} bytes expanding to {BOMB_BYTES} (1 kB expected)",
                      lambda: read_chunk_image(image))

    return [run_once]


# -- the child entry point --------------------------------------------------------------------------


def child_main(target: str, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    harness = Harness(target, workdir)
    kind, _, arg = target.partition(":")
    if kind in ("ngff_attributes", "array_metadata"):
        runs = _volume_target(harness, kind)
    elif kind == "spatial_transforms":
        runs = _spatial_target(harness)
    elif kind == "datasplit_csv":
        runs = _csv_target(harness)
    elif kind == "chunk":
        runs = _chunk_target(harness, arg)
    elif kind == "bomb":
        runs = _bomb_target(harness, arg)
    else:
        raise SystemExit(f"unknown fuzz target {target!r}")
    harness.limit_address_space()
    try:
        for run in runs:
            run()
    except BaseException:
        traceback.print_exc()
        print("FUZZ-SUMMARY " + json.dumps(harness.summary()), flush=True)
        return 1
    print("FUZZ-SUMMARY " + json.dumps(harness.summary()), flush=True)
    if harness.failures:
        print(f"{len(harness.failures)} kinds of failure:\n\n" + "\n\n".join(harness.failures.values()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(child_main(sys.argv[1], Path(sys.argv[2])))
