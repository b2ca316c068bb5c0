"""Process and object lifecycle: fork and spawn children, Ctrl-C while a batch is read, a loader
deleted or left mid-epoch, torch's DataLoader with persistent workers over several epochs.

Every test has a timeout (and child processes a join timeout) so that a hang fails. Engine
threads are counted by name from /proc/self/task/*/comm: ``cellmap-engine-*`` (the process's
default pool, kept for the process's life), ``cellmap-loader-*`` and ``cellmap-dispatch`` (one
set per batch stream, gone when the stream stops). Linux truncates the names to 15 characters.
"""

from __future__ import annotations

import gc
import glob
import multiprocessing
import signal
import threading
import time
import traceback
from collections import Counter

import numpy as np
import pytest
import torch

from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset, _engine

AUGMENT = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.5}},
    "transpose": {"axes": ["x", "y"]},
    "rotate": {"axes": {"z": [-180, 180]}},
}


# -- helpers ------------------------------------------------------------------------------------

def engine_threads() -> Counter:
    """Names of this process's engine threads (``cellmap-*``), counted."""
    names: Counter = Counter()
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as handle:
                name = handle.read().strip()
        except OSError:  # the thread ended while listing
            continue
        if name.startswith("cellmap-"):
            names[name] += 1
    return names


def extra_threads(baseline: Counter, timeout: float) -> tuple[Counter, float]:
    """Engine threads beyond ``baseline``, polled until there are none or ``timeout`` passes
    (a stopped pool's threads exit asynchronously); and the seconds it took."""
    start = time.monotonic()
    while True:
        extra = engine_threads() - baseline
        waited = time.monotonic() - start
        if not extra or waited >= timeout:
            return extra, waited
        time.sleep(0.01)


def rss_mb() -> float:
    """VmRSS of this process (MB), from /proc/self/status."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def small_multi(data, seed: int = 5, crops: list[int] | None = None) -> CellMapMultiDataset:
    """The crops (all, or those at the given positions) of the tiny data, 8^3 patches at 8 nm,
    augmented."""
    pairs = [(d, crop) for d in data.datasets for crop in d.crops]
    datasets = [
        CellMapDataset(
            str(d.raw_path), crop.target_path, data.classes,
            {"raw": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, {"gt": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
            pad=True, spatial_transforms=AUGMENT, seed=seed,
        )
        for n, (d, crop) in enumerate(pairs) if crops is None or n in crops
    ]
    return CellMapMultiDataset(datasets, data.classes, None, None)


def big_dataset(data, shape: int, classes, spatial_transforms) -> CellMapDataset:
    """One crop of the tiny data read as large patches at its full (4 nm) resolution: slow,
    big batches."""
    d = data.datasets[0]
    return CellMapDataset(
        str(d.raw_path), d.crops[0].target_path, list(classes),
        {"raw": {"shape": (shape,) * 3, "scale": (4, 4, 4)}}, {"gt": {"shape": (shape,) * 3, "scale": (4, 4, 4)}},
        pad=True, spatial_transforms=spatial_transforms, seed=5,
    )


LOADER_KWARGS = {"batch_size": 3, "iterations_per_epoch": 6, "num_workers": 2, "seed": 17}


def as_arrays(batches) -> list[dict[str, np.ndarray]]:
    """Batches as plain numpy arrays (what crosses a process boundary)."""
    return [{k: v.numpy().copy() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]


def assert_same_batches(got, expected, what: str) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} batches, expected {len(expected)}"
    for n, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), f"{what}: batch {n} keys {sorted(a)} != {sorted(b)}"
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what}: batch {n}, {key!r}")


def _reply(queue, work) -> None:
    """Runs ``work`` in a child and sends ("ok", result) or ("error", traceback) to the parent."""
    try:
        queue.put(("ok", work()))
    except BaseException:  # noqa: BLE001 - everything (a PanicException too) goes to the parent
        queue.put(("error", traceback.format_exc()))


def fork_child(work):
    """A forked child running ``work`` (see :func:`_reply`), started, and its reply queue."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_reply, args=(queue, work))
    child.start()
    return child, queue


def wait_for_child(child, queue, timeout: float = 120):
    """The child's result; fails on a hang (no reply or no exit in time), an error or a crash."""
    try:
        status, value = queue.get(timeout=timeout)
    except Exception:  # queue.Empty: no reply in time
        child.join(timeout=5)
        code = child.exitcode
        if code is None:
            child.kill()
            child.join(timeout=5)
        pytest.fail(f"the child process sent no result within {timeout} s (exit code {code}: None = hung, < 0 = killed by a signal)")
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
        child.join(timeout=5)
        pytest.fail("the child process sent its result but did not exit within 60 s (hung at exit)")
    assert status == "ok", f"the child process failed:\n{value}"
    assert child.exitcode == 0, f"the child process exited with {child.exitcode} after sending its result"
    return value


# -- fork and spawn -----------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_forked_child_iterates_a_loader_built_in_the_parent_mid_epoch(tiny_data):
    """A loader built and iterated in the parent is iterated in a child forked while the parent's
    stream has engine threads reading: the child gets the same batches as the parent for the
    same epochs (0, read before the fork, and 2, read after), and the parent's own epoch 1
    carries on unharmed."""
    loader = CellMapDataLoader(small_multi(tiny_data), **LOADER_KWARGS)
    epoch0 = as_arrays(loader)  # the engine's threads, cache and pools are in use before the fork
    running = iter(loader)  # epoch 1, in flight across the fork
    first = as_arrays([next(running)])
    assert engine_threads()["cellmap-dispatc"] >= 1, "expected the parent's stream to be running at the fork"

    def child_work():
        assert not engine_threads(), "a forked child has no engine thread until it reads"
        loader.epoch = 2
        next_epoch = as_arrays(loader)
        loader.epoch = 0
        return {"epoch0": as_arrays(loader), "epoch2": next_epoch}

    child, queue = fork_child(child_work)
    try:
        got = wait_for_child(child, queue)
        epoch1 = first + as_arrays(running)
    finally:
        running.close()  # on failure too: no stream left running into the next test
    assert len(epoch1) == LOADER_KWARGS["iterations_per_epoch"]
    epoch2 = as_arrays(loader)
    assert_same_batches(got["epoch0"], epoch0, "child's epoch 0 vs parent's")
    assert_same_batches(got["epoch2"], epoch2, "child's epoch 2 vs parent's")
    assert any(not np.array_equal(a["raw"], b["raw"], equal_nan=True) for a, b in zip(epoch0, epoch2)), "epochs should differ"


@pytest.mark.timeout(180)
def test_forked_child_can_drop_the_parent_s_stream_and_read(tiny_data):
    """A child forked while the parent iterates a loader abandons the iterator it inherited
    (closing it, as garbage collection or interpreter exit would), then reads the same epoch
    itself and exits cleanly."""
    loader = CellMapDataLoader(small_multi(tiny_data), **LOADER_KWARGS)
    running = iter(loader)  # epoch 0, in flight across the fork
    first = as_arrays([next(running)])

    def child_work():
        running.close()  # the parent's stream: its threads do not exist in the child
        loader.epoch = 0
        return as_arrays(loader)

    child, queue = fork_child(child_work)
    try:
        got = wait_for_child(child, queue)
        expected = first + as_arrays(running)
    finally:
        running.close()  # on failure too: no stream left running into the next test
    assert_same_batches(got, expected, "child's epoch 0 vs parent's")


def _read_and_exit(loader, expected_batches: int) -> None:
    import sys

    sys.exit(0 if sum(1 for _ in loader) == expected_batches else 3)


@pytest.mark.timeout(300)
def test_repeated_forks_while_the_parent_s_threads_read_never_hang(tiny_data):
    """20 children forked one after another while the parent's engine threads are busy reading
    rotated patches (whatever lock they hold at that instant is copied locked into the child):
    each child reads an epoch of another loader and exits 0 within its timeout."""
    busy = CellMapDataLoader(big_dataset(tiny_data, 48, ["mito", "er"], {"rotate": {"axes": {"z": [-180, 180]}}}),
                             batch_size=2, iterations_per_epoch=100_000, num_workers=2, seed=1, prefetch_factor=8)
    small = CellMapDataLoader(small_multi(tiny_data), batch_size=2, iterations_per_epoch=3, num_workers=2, seed=2)
    ctx = multiprocessing.get_context("fork")
    running = iter(busy)
    codes = []
    try:
        for _ in range(20):
            next(running)
            child = ctx.Process(target=_read_and_exit, args=(small, 3))
            child.start()
            child.join(timeout=60)
            if child.exitcode is None:
                child.kill()
                child.join(timeout=5)
                codes.append("hung")
            else:
                codes.append(child.exitcode)
    finally:
        running.close()
    assert codes == [0] * 20, f"child exit codes (< 0: killed by that signal): {codes}"


def _spawned_reads(queue, dataset, loader_kwargs, epochs):
    """Target of the spawned child: a loader over the pickled dataset, the given epochs."""

    def work():
        loader = CellMapDataLoader(dataset, **loader_kwargs)
        out = []
        for epoch in epochs:
            loader.epoch = epoch
            out.append(as_arrays(loader))
        return out

    _reply(queue, work)


@pytest.mark.timeout(240)
def test_spawned_child_gets_the_same_batches_for_the_same_seed(tiny_data):
    """A spawned child (fresh interpreter, the dataset pickled across) builds a loader with the
    same seed and reads the same batches as the parent, epoch by epoch."""
    dataset = small_multi(tiny_data)
    loader = CellMapDataLoader(dataset, **LOADER_KWARGS)
    expected = [as_arrays(loader), as_arrays(loader)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_spawned_reads, args=(queue, dataset, LOADER_KWARGS, [0, 1]))
    child.start()
    got = wait_for_child(child, queue, timeout=180)
    for epoch in (0, 1):
        assert_same_batches(got[epoch], expected[epoch], f"spawned child's epoch {epoch} vs parent's")


# -- Ctrl-C -------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_keyboard_interrupt_while_a_batch_is_read_returns_within_a_second(tiny_data):
    """SIGINT delivered while the loop waits for a slow batch (128^3 rotated patches, two
    threads, about a second per batch here) raises KeyboardInterrupt within a second, and the
    stream's engine threads are gone within a second after."""
    dataset = big_dataset(tiny_data, 128, ["mito", "er"], {"rotate": {"axes": {"z": [-180, 180], "y": [-30, 30]}}})
    loader = CellMapDataLoader(dataset, batch_size=4, iterations_per_epoch=1000, num_workers=2, seed=3)
    dataset[0]  # the process's default engine pool exists before the baseline
    gc.collect()
    baseline = engine_threads()
    sent: list[float] = []
    waits: list[float] = []

    def interrupt_soon():
        time.sleep(0.3)
        sent.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    caught = None
    delivered = 0
    try:
        iterator = iter(loader)
        next(iterator)  # the stream runs: the next batches are being read
        during = engine_threads() - baseline
        timer = threading.Thread(target=interrupt_soon, daemon=True)
        timer.start()
        try:
            while True:
                started = time.monotonic()
                next(iterator)
                waits.append(time.monotonic() - started)
                delivered += 1
        except KeyboardInterrupt:
            caught = time.monotonic()
        timer.join(timeout=5)
        del iterator
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent, "the timer never sent SIGINT"
    assert caught is not None, "no KeyboardInterrupt"
    returned_after = caught - sent[0]
    left, settled_after = extra_threads(baseline, timeout=1.0)
    print(f"threads during the read {dict(during)}; batches delivered after the first before SIGINT {delivered} "
          f"(waits {[round(w, 3) for w in waits]}); KeyboardInterrupt {returned_after * 1000:.0f} ms after SIGINT; "
          f"stream threads gone {settled_after * 1000:.0f} ms later; left {dict(left)}")
    assert during["cellmap-loader-"] >= 1 and during["cellmap-dispatc"] >= 1, f"expected the stream's threads, saw {dict(during)}"
    assert returned_after < 1.0, f"KeyboardInterrupt came {returned_after:.2f} s after SIGINT"
    assert not left, f"engine threads still running 1 s after the interrupt: {dict(left)}"


# -- teardown: memory and threads ---------------------------------------------------------------

def _leave_mid_epoch(dataset, how: str, batch_size: int, prefetch: int) -> tuple[float, int]:
    """Reads two batches of a 50-batch epoch, lets the prefetch queue fill, then leaves: breaks
    out of the loop, or deletes the loader and its iterator. Returns RSS (MB) and the live batch
    bytes just before leaving."""
    loader = CellMapDataLoader(dataset, batch_size=batch_size, iterations_per_epoch=50, num_workers=2, seed=3,
                               prefetch_factor=prefetch)
    if how == "break":
        for n, batch in enumerate(loader):
            if n == 1:
                time.sleep(0.5)
                held = rss_mb(), _engine.live_batch_bytes()
                break
        del batch
    else:
        iterator = iter(loader)
        batch = next(iterator)
        batch = next(iterator)
        time.sleep(0.5)
        held = rss_mb(), _engine.live_batch_bytes()
        del loader, iterator, batch
    gc.collect()
    return held


def _leave_cycles(queue, dataset, how: str, batch_size: int, prefetch: int, cycles: int) -> None:
    """Target of the measuring child: leaves a loader mid-epoch ``cycles`` times and reports, for
    each time, RSS and live batch bytes before and after, what the engine keeps on purpose,
    RSS once that is freed too, and the engine threads left."""

    def work():
        dataset[0]  # the default engine pool exists before the baseline
        _engine.clear_cache()
        gc.collect()
        baseline_threads, live0, rss0 = engine_threads(), _engine.live_batch_bytes(), rss_mb()
        out = []
        for _ in range(cycles):
            held_rss, held_live = _leave_mid_epoch(dataset, how, batch_size, prefetch)
            left, settled = extra_threads(baseline_threads, timeout=1.0)
            deadline = time.monotonic() + 2.0
            while _engine.live_batch_bytes() != live0 and time.monotonic() < deadline:
                time.sleep(0.01)
            row = {"rss0": rss0, "held_rss": held_rss, "held_live_mb": held_live / 2**20,
                   "live_after_mb": (_engine.live_batch_bytes() - live0) / 2**20, "rss_after": rss_mb(),
                   "pooled_mb": _engine.pooled_batch_bytes() / 2**20, "cached_mb": _engine.cache_stats()["bytes"] / 2**20,
                   "threads_left": dict(left), "threads_gone_s": settled}
            _engine.clear_cache()
            gc.collect()
            row["rss_cleared"] = rss_mb()
            out.append(row)
        return out

    _reply(queue, work)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["break", "del"])
def test_leaving_a_loader_mid_epoch_frees_its_memory_and_threads(tiny_data, how, monkeypatch):
    """Breaking out of the loop, or deleting the loader and its iterator, mid-epoch (prefetched
    batches queued, reads in flight), three times over: each time no batch memory stays alive,
    the stream's threads end within a second, RSS comes back to the start plus what the engine
    keeps on purpose (the chunk cache and the pooled batch buffers, themselves bounded by the
    batches in flight), and to the start itself once ``clear_cache()`` frees those.

    Measured in a fresh interpreter whose C allocator returns every large freed block to the
    system at once (``MALLOC_MMAP_THRESHOLD_``): with glibc's default dynamic threshold, freed
    batch buffers land in per-thread arenas whose tops glibc keeps even after ``malloc_trim``,
    and RSS then sits a batch or two above what is alive, varying from run to run."""
    classes = ["mito", "er"]
    batch_size, shape, prefetch, threads = 4, 96, 4, 2
    batch_mb = batch_size * (1 + len(classes)) * shape**3 * 4 / 2**20  # float32 raw + one channel per class
    dataset = big_dataset(tiny_data, shape, classes, {"mirror": {"axes": {"x": 0.5}}})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_leave_cycles, args=(queue, dataset, how, batch_size, prefetch, 3))
    child.start()
    rows = wait_for_child(child, queue, timeout=180)
    for n, r in enumerate(rows):
        print(f"{how} #{n}: batch {batch_mb:.1f} MB; RSS start {r['rss0']:.0f} MB, mid-epoch {r['held_rss']:.0f} MB "
              f"(live batches {r['held_live_mb']:.0f} MB), after {r['rss_after']:.0f} MB (pooled {r['pooled_mb']:.0f} MB, "
              f"chunk cache {r['cached_mb']:.1f} MB), after clear_cache {r['rss_cleared']:.0f} MB; live batch MB after "
              f"{r['live_after_mb']:.1f}; threads gone after {r['threads_gone_s'] * 1000:.0f} ms, left {r['threads_left']}")
    for n, r in enumerate(rows):
        assert r["held_live_mb"] >= 2 * batch_mb, "the test should hold several batches mid-epoch"
        assert not r["threads_left"], f"#{n}: engine threads still running 1 s after the loader was left: {r['threads_left']}"
        assert r["live_after_mb"] == 0, f"#{n}: {r['live_after_mb']:.1f} MB of batch memory still alive"
        assert r["pooled_mb"] <= (prefetch + 2 + threads) * batch_mb, (
            f"#{n}: pooled buffers {r['pooled_mb']:.0f} MB exceed prefetch + 2 + threads batches")
        assert r["rss_after"] - r["rss0"] <= r["pooled_mb"] + r["cached_mb"] + 1.5 * batch_mb, (
            f"#{n}: RSS {r['rss_after'] - r['rss0']:.0f} MB above the start with {r['pooled_mb']:.0f} MB pooled "
            f"and {r['cached_mb']:.1f} MB cached")
        assert r["rss_cleared"] - r["rss0"] <= 1.5 * batch_mb, (
            f"#{n}: RSS {r['rss_cleared'] - r['rss0']:.0f} MB above the start after clear_cache()")


# -- torch DataLoader with persistent workers ---------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_torch_dataloader_with_persistent_workers_over_three_epochs(tiny_data, start):
    """``torch.utils.data.DataLoader(num_workers=2, persistent_workers=True)`` over the
    library's IterableDataset, workers forked or spawned: each of 3 epochs delivers exactly the
    planned samples (the engine's epoch plan: every index once, the planned centre and seed), no
    sample twice across the workers, epochs differ, and the workers exit when the DataLoader
    goes."""
    dataset = small_multi(tiny_data, crops=[1, 3])  # two crops, about 1 200 samples
    kwargs = {"is_train": True, "seed": 23, "return_metadata": True}
    iterable = dataset.as_iterable(batch_size=8, **kwargs)
    planner = CellMapDataLoader(dataset, batch_size=8, **kwargs)
    columns = ["dataset", "idx", "centre_z", "centre_y", "centre_x", "value_seed"]
    torch_loader = torch.utils.data.DataLoader(iterable, batch_size=None, num_workers=2, persistent_workers=True,
                                               multiprocessing_context=start)
    epochs = []
    workers = []
    for epoch in range(3):
        rows, global_idx = [], []
        for batch in torch_loader:
            global_idx += batch["idx"].tolist()
            rows += [tuple(m[c] for c in columns) for m in batch["__metadata__"]]
            assert batch["raw"].shape[0] == len(batch["__metadata__"])
        if not workers:
            workers = list(torch_loader._iterator._workers)
        planned = planner.epoch_metadata(epoch)
        expected = sorted(zip(*(planned[c].to_list() for c in columns)))
        assert len(rows) == len(planned) == len(dataset), f"epoch {epoch}: {len(rows)} samples, planned {len(planned)}"
        assert len(set(global_idx)) == len(global_idx), f"epoch {epoch}: a sample was delivered twice"
        assert sorted(global_idx) == list(range(len(dataset)))
        assert sorted(rows) == expected, f"epoch {epoch}: the samples delivered are not the planned ones"
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2], "each pass should be a new epoch"
    assert len(workers) == 2 and all(w.is_alive() for w in workers), "persistent workers stay up between epochs"
    del torch_loader
    gc.collect()
    for w in workers:
        w.join(timeout=30)
    assert all(w.exitcode is not None for w in workers), "a worker did not exit after the DataLoader went"
    assert all(w.exitcode == 0 for w in workers), f"worker exit codes {[w.exitcode for w in workers]}"
