"""Writer crash safety: a process writing predictions with the public ``ImageWriter`` is killed
with SIGKILL at random moments (seeded), then the output is checked with zarr-python; a rerun
must reproduce an uninterrupted run exactly; two processes writing disjoint parts of one image
must not corrupt each other.

Writers run in child processes forked from a ``forkserver`` that has already imported
``cellmap_data`` and torch, so a child starts in milliseconds and the kill moments are spread
over the writer's own work (creation, tile writes, ``close()`` and its downsampled level), not
over the interpreter start-up.

Tile values are a function of the tile's position alone (``tile_values``), never the fill
value, so every chunk file can be checked against what it must contain.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import zarr

VOXEL = 4.0
TILE = 32  # voxels per tile edge; tiles are chunks unless a test says otherwise
GRID = 4  # tiles per axis
SIZE = TILE * GRID  # voxels per axis
N_CREATE_KILLS = 6  # kill moments while the writer creates the image
N_WRITE_KILLS = 6  # kill moments while it writes tiles and closes
CLASS = "pred"

# A temporary file the writer leaves when killed: a hidden `.NAME.PID-N.partial` sibling.
PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<n>\d+)\.partial$")
METADATA = {".zarray", ".zattrs", ".zgroup", "zarr.json"}


# -- what the writers write (also run inside the child processes) -----------------------------


def tile_values(start, tile=TILE):
    """The prediction of the tile whose first voxel is ``start`` (z, y, x): incompressible,
    deterministic from the position, in [1, 2) so it is never the fill value 0."""
    rng = np.random.default_rng([int(s) for s in start])
    return rng.random((tile, tile, tile), dtype=np.float32) + np.float32(1.0)


def tile_starts(tile=TILE):
    n = SIZE // tile
    return [(z * tile, y * tile, x * tile) for z in range(n) for y in range(n) for x in range(n)]


def expected_volume(tile=TILE):
    out = np.zeros((SIZE,) * 3, dtype=np.float32)
    for s in tile_starts(tile):
        out[s[0]:s[0] + tile, s[1]:s[1] + tile, s[2]:s[2] + tile] = tile_values(s, tile)
    return out


def make_writer(path, *, zarr_format=2, downsample_levels=1, overwrite=False, tile=TILE, chunks=None, **extra):
    from cellmap_data import ImageWriter

    box = {a: (0.0, SIZE * VOXEL) for a in "zyx"}
    return ImageWriter(
        str(path), CLASS, {a: VOXEL for a in "zyx"}, box, {a: tile for a in "zyx"},
        overwrite=overwrite, zarr_format=zarr_format, downsample_levels=downsample_levels,
        chunks=None if chunks is None else {a: chunks for a in "zyx"}, **extra,
    )


def open_existing_writer(path, **kwargs):
    """Opens an existing output image for writing more tiles into it, keeping what is there.

    This is the API the multi-process tests need; ``exist_ok=True`` is the proposed spelling
    (it does not exist yet: ``overwrite=False`` raises ``OutputExistsError`` on an existing
    image, and ``overwrite=True`` deletes it). Change this one call when the API lands."""
    return make_writer(path, overwrite=False, exist_ok=True, **kwargs)


def centre(start, tile=TILE):
    return {a: (s + tile / 2) * VOXEL for a, s in zip("zyx", start)}


def write_job(conn, paths, options, tiles, tile, existing, gate):
    """Child process: for each path, create (or open) the writer, write ``tiles``, close,
    reporting each phase (with its time) on ``conn``; an exception is reported (naming the
    path), not raised, and the next path is written."""
    for path in paths:
        try:
            if gate is not None:
                gate.wait(timeout=60)
            conn.send(("started", time.monotonic()))
            writer = (open_existing_writer if existing else make_writer)(path, tile=tile, **options)
            conn.send(("ready", time.monotonic()))
            for start in tiles:
                writer[centre(start, tile)] = tile_values(start, tile)
            conn.send(("written", time.monotonic()))
            writer.close()
            conn.send(("closed", time.monotonic()))
        except BaseException:
            conn.send(("error", f"{path}:\n{traceback.format_exc()}"))
    conn.send(("done", time.monotonic()))


# -- process plumbing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx():
    """A forkserver that has imported the package (and torch) once; children fork from it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "torch", "zarr", "cellmap_data", "cellmap_data.writer", __name__])
    return context


class Child:
    """A writer child process and the phases it reported."""

    def __init__(self, ctx, paths, options, *, tiles=None, tile=TILE, existing=False, gate=None):
        self.recv, send = ctx.Pipe(duplex=False)
        tiles = tile_starts(tile) if tiles is None else tiles
        self.process = ctx.Process(target=write_job, args=(send, [str(p) for p in paths], options, tiles, tile, existing, gate))
        self.process.start()
        send.close()
        self.phases: dict[str, float] = {}
        self.errors: list[str] = []

    def wait_for(self, phase, timeout=120.0):
        """Blocks until the child reports ``phase`` (False if it ended or failed first)."""
        deadline = time.monotonic() + timeout
        while phase not in self.phases:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"writer child did not reach {phase!r} within {timeout} s")
            if not self.recv.poll(min(left, 1.0)):
                if not self.process.is_alive() and not self.recv.poll(0):
                    return False
                continue
            try:
                name, value = self.recv.recv()
            except EOFError:
                return False
            if name == "error":
                self.errors.append(value)
            else:
                self.phases[name] = value
        return True

    def finish(self, timeout=120.0, *, check=True):
        """Waits for the child to write every path; with ``check``, fails on any error."""
        ok = self.wait_for("done", timeout)
        self.process.join(timeout)
        if check:
            assert not self.errors, "writer child failed:\n" + "\n".join(self.errors)
        assert ok and self.process.exitcode == 0, f"writer child exit code {self.process.exitcode}"

    def kill_after(self, phase, delay):
        """SIGKILLs the child ``delay`` s after it reported ``phase``; returns the last phase
        it reported before dying."""
        assert self.wait_for(phase) and not self.errors, f"child ended before {phase!r}: {self.errors}"
        time.sleep(delay)
        self.process.kill()
        self.process.join(30)
        while self.recv.poll(0):  # phases reported before the kill
            try:
                name, value = self.recv.recv()
            except EOFError:
                break
            if name == "error":
                self.errors.append(value)
            else:
                self.phases[name] = value
        assert not self.errors, "writer child failed:\n" + "\n".join(self.errors)
        return max(self.phases, key=self.phases.get)


# -- checking an output on disk ----------------------------------------------------------------


def files(root):
    """Relative path → bytes of every file under ``root``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def split_partials(tree):
    """(visible files, hidden temporary files) of a tree from ``files``."""
    visible, partial = {}, {}
    for rel, data in tree.items():
        (partial if PARTIAL.match(rel.rsplit("/", 1)[-1]) else visible)[rel] = data
    return visible, partial


def chunk_index(rel, zarr_format):
    """(level, chunk index) of a chunk file path relative to the image, e.g. ``s0/1.2.3`` or
    ``s0/c/1/2/3``."""
    parts = rel.split("/")
    if zarr_format == 2:
        return parts[0], tuple(int(v) for v in parts[1].split("."))
    assert parts[1] == "c", rel
    return parts[0], tuple(int(v) for v in parts[2:])


def check_interrupted_output(container, image_rel, reference, zarr_format, pid, last_phase, label):
    """The state a killed writer leaves: only whole files; hidden temporaries of the killed
    process only; every chunk byte-identical to the uninterrupted run's and decoding (with
    zarr-python) to the tile it must hold; valid metadata that zarr-python opens."""
    tree = files(container)
    visible, partial = split_partials(tree)
    for rel in partial:
        match = PARTIAL.match(rel.rsplit("/", 1)[-1])
        assert int(match["pid"]) == pid, f"{label}: temporary file {rel} is not the killed writer's"
    hidden = [r for r in visible if r.rsplit("/", 1)[-1].startswith(".") and r.rsplit("/", 1)[-1] not in METADATA]
    assert not hidden, f"{label}: unexpected hidden files {hidden}"
    for rel, data in visible.items():
        name = rel.rsplit("/", 1)[-1]
        if name in METADATA:
            try:
                json.loads(data)
            except ValueError as e:
                raise AssertionError(f"{label}: metadata file {rel} is not valid JSON ({e}): {data[:200]!r}") from None
        else:
            assert rel in reference, f"{label}: {rel} is not a file of the uninterrupted run"
            assert data == reference[rel], f"{label}: chunk {rel} differs from the uninterrupted run's (torn or wrong)"
    image = Path(container) / image_rel
    complete_metadata = last_phase != "started"
    if not complete_metadata and not (image / (".zattrs" if zarr_format == 2 else "zarr.json")).is_file():
        return 0
    group = zarr.open_group(str(image), mode="r")
    attrs = group.attrs.asdict()
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        assert not complete_metadata, f"{label}: the writer reported ready but the image has no multiscales"
        return 0
    levels = [d["path"] for d in multiscales[0]["datasets"]]
    expect = expected_volume()
    n_s0 = 0
    for level in levels:
        array = zarr.open_array(str(image / level), mode="r")
        on_disk = [r[len(image_rel) + 1:] for r in visible if r.startswith(f"{image_rel}/{level}/")
                   and r.rsplit("/", 1)[-1] not in METADATA]
        assert array.nchunks_initialized == len(on_disk), f"{label}: zarr-python sees other chunks than the files in {level}"
        for rel in on_disk:
            lvl, index = chunk_index(rel, zarr_format)
            block = array.blocks[index]
            if lvl == "s0":
                sl = tuple(slice(i * TILE, (i + 1) * TILE) for i in index)
                np.testing.assert_array_equal(block, expect[sl], err_msg=f"{label}: chunk {rel}")
                n_s0 += 1
            else:
                assert np.isfinite(block).all() and (block > 0).all(), f"{label}: chunk {rel} of {lvl}"
    return n_s0


# -- tests ----------------------------------------------------------------------------------------


def kill_moments(create, work, seed):
    """(phase, delay s) pairs: stratified random moments spread over the image creation
    (``create`` s after "started") and over the tile writes and close (``work`` s after
    "ready", a little past the end)."""
    rng = random.Random(seed)
    moments = [("started", create * (k + rng.random()) / N_CREATE_KILLS) for k in range(N_CREATE_KILLS)]
    moments += [("ready", 1.1 * work * (k + rng.random()) / N_WRITE_KILLS) for k in range(N_WRITE_KILLS)]
    return moments


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_killed_writer_leaves_whole_chunks_and_a_rerun_matches_an_uninterrupted_run(tmp_path, ctx, zarr_format):
    """SIGKILL at seeded random moments (during creation, tile writes and close()); then every
    file present is whole and correct, and rerunning with overwrite=True reproduces the
    uninterrupted run byte for byte."""
    options = {"zarr_format": zarr_format, "downsample_levels": 1}
    image_rel = CLASS
    ref_container = tmp_path / "reference.zarr"
    ref = Child(ctx, [ref_container / image_rel], options)
    ref.finish()
    reference, leftovers = split_partials(files(ref_container))
    assert not leftovers, f"an uninterrupted run leaves temporary files: {sorted(leftovers)}"
    values = zarr.open_array(str(ref_container / image_rel / "s0"), mode="r")[...]
    np.testing.assert_array_equal(values, expected_volume())
    create = ref.phases["ready"] - ref.phases["started"]
    work = ref.phases["closed"] - ref.phases["ready"]

    report, killed = [], []
    for seed, (phase, delay) in enumerate(kill_moments(create, work, seed=zarr_format)):
        container = tmp_path / f"kill{seed}.zarr"
        child = Child(ctx, [container / image_rel], options)
        last = child.kill_after(phase, delay)
        label = f"zarr v{zarr_format}, seed {seed} (killed {delay * 1e3:.1f} ms after {phase!r}, last phase {last!r})"
        n = check_interrupted_output(container, image_rel, reference, zarr_format, child.process.pid, last, label)
        report.append((seed, phase, round(delay * 1e3, 1), last, n))
        killed.append(container)
    print(f"zarr v{zarr_format}: create {create * 1e3:.1f} ms, write+close {work * 1e3:.1f} ms;",
          "(seed, after, delay ms, last phase, s0 chunks present):", report)
    assert any(0 < r[4] < GRID ** 3 for r in report), f"no kill landed among the tile writes: {report}"

    rerun = Child(ctx, [c / image_rel for c in killed], {**options, "overwrite": True})
    rerun.finish(check=False)
    problems = list(rerun.errors)
    for container in killed:
        if any(str(container / image_rel) in e for e in rerun.errors):
            continue
        visible, _ = split_partials(files(container))
        if sorted(visible) != sorted(reference):
            problems.append(f"{container.name}: files differ after the rerun: {sorted(set(visible) ^ set(reference))}")
        problems += [f"{container.name}: {rel} differs from the uninterrupted run after the rerun"
                     for rel, data in visible.items() if rel in reference and data != reference[rel]]
    assert not problems, "rerunning the killed writes with overwrite=True:\n" + "\n".join(problems)


def run_two_writers(ctx, path, tiles_a, tiles_b, tile, options):
    """Two child processes open the existing image at ``path`` and write their tiles at the
    same time (a barrier starts them together); both must finish without error."""
    gate = ctx.Barrier(2)
    children = [Child(ctx, [path], options, tiles=t, tile=tile, existing=True, gate=gate) for t in (tiles_a, tiles_b)]
    for child in children:
        child.finish()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_two_processes_writing_disjoint_chunks_of_one_image_do_not_corrupt_each_other(tmp_path, ctx, zarr_format):
    """The image is created once; two processes then open it for writing (without erasing it)
    and write alternate chunks (a 3D checkerboard of whole chunks); the result is the union."""
    path = tmp_path / "shared.zarr" / CLASS
    options = {"zarr_format": zarr_format, "downsample_levels": 0}
    make_writer(path, **options).close()
    starts = tile_starts()
    a = [s for s in starts if (sum(s) // TILE) % 2 == 0]
    b = [s for s in starts if (sum(s) // TILE) % 2 == 1]
    run_two_writers(ctx, path, a, b, TILE, options)
    array = zarr.open_array(str(path / "s0"), mode="r")
    assert array.nchunks_initialized == GRID ** 3
    np.testing.assert_array_equal(array[...], expected_volume())


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_two_processes_writing_disjoint_halves_of_shared_chunks_do_not_corrupt_each_other(tmp_path, ctx, zarr_format):
    """Tiles are half a chunk along x; one process writes the even tiles, the other the odd
    ones, so every chunk gets voxels from both processes; the result is still the union."""
    path = tmp_path / "shared.zarr" / CLASS
    tile = TILE // 2
    options = {"zarr_format": zarr_format, "downsample_levels": 0, "chunks": TILE}
    make_writer(path, tile=tile, **options).close()
    starts = tile_starts(tile)
    a = [s for s in starts if (s[2] // tile) % 2 == 0]
    b = [s for s in starts if (s[2] // tile) % 2 == 1]
    run_two_writers(ctx, path, a, b, tile, options)
    array = zarr.open_array(str(path / "s0"), mode="r")
    np.testing.assert_array_equal(array[...], expected_volume(tile))


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("state", ["level arrays, no image group metadata", "empty level folder"])
def test_overwrite_replaces_an_image_whose_creation_was_killed(tmp_path, zarr_format, state):
    """The states a kill during creation leaves (the image group's metadata is written last:
    the level arrays may exist without it, or only a level's folder): rerunning with
    overwrite=True must replace them, as it replaces a complete image."""
    path = tmp_path / "out.zarr" / CLASS
    options = {"zarr_format": zarr_format, "downsample_levels": 1}
    make_writer(path, **options).close()
    for name in (".zgroup", ".zattrs", "zarr.json"):
        (path / name).unlink(missing_ok=True)
    if state == "empty level folder":
        for child in path.iterdir():
            for f in sorted(child.rglob("*"), reverse=True):
                f.rmdir() if f.is_dir() else f.unlink()
            child.rmdir()
        (path / "s0").mkdir()
    with make_writer(path, overwrite=True, **options) as writer:
        for start in tile_starts():
            writer[centre(start)] = tile_values(start)
    np.testing.assert_array_equal(zarr.open_array(str(path / "s0"), mode="r")[...], expected_volume())
