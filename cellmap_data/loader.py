"""`CellMapDataLoader`: batches read by engine threads (no worker processes, nothing pickled)
into a bounded prefetch queue, optionally moved to the GPU one step ahead on a side stream."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ._config import distributed_context, resolve_device
from .batches import apply_value_transforms_by_owner, expand_compact, sample_metadata_dicts, to_axis_order_by_owner
from .exceptions import ConfigError, ReadErrorWarning, warn_reference_difference

__all__ = ["CellMapDataLoader", "CellMapIterableDataset", "ClassBalancedSampler", "EpochBatchSampler", "EpochSampler",
           "distributed_context"]

_PLAN = tuple[int, int, int]
READ_ERROR_POLICIES = ("raise", "skip", "retry")
MAX_KEPT_INCIDENTS = 10_000


def _seed_of(rng: Any, seed: int | None, dataset: Any) -> int:
    if seed is not None:
        return int(seed) & ((1 << 63) - 1)
    if isinstance(rng, torch.Generator):
        return int(rng.initial_seed()) & ((1 << 63) - 1)
    first = getattr(dataset, "datasets", [dataset])
    if first and hasattr(first[0], "seed"):
        return int(first[0].seed)
    return int(torch.initial_seed()) & ((1 << 63) - 1)


def as_multi(dataset: Any) -> tuple[Any, list[int] | None]:
    """The multi-dataset behind ``dataset`` and, for subsets, the allowed global indices. Datasets
    answer ``as_multi()`` themselves, so the loader imports none of the dataset modules."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner, sub = as_multi(dataset.dataset)
        indices = [sub[i] for i in dataset.indices] if sub is not None else list(dataset.indices)
        return inner, indices
    view = getattr(dataset, "as_multi", None)
    if view is None:
        raise ConfigError(f"expected a CellMapDataset, CellMapMultiDataset or subset of one, not {type(dataset).__name__}")
    return view(), None


def _rows_of(dataset: Any, rows: int) -> list[int]:
    """Samples per row of a crop-class matrix of ``rows`` rows over ``dataset``: the parts of a
    concatenation (``datasets`` + ``cumulative_sizes``), one sample per row, or ``len(dataset)``
    split evenly over the rows."""
    total = len(dataset)
    cumulative = getattr(dataset, "cumulative_sizes", None)
    if cumulative is not None and len(cumulative) == rows:
        ends = [int(c) for c in cumulative]
        return [b - a for a, b in zip([0] + ends[:-1], ends)]
    if rows == total:
        return [1] * rows
    if rows == 0 or rows > total:
        raise ConfigError(f"a crop-class matrix of {rows} rows cannot describe a dataset of {total} samples")
    base, extra = divmod(total, rows)
    return [base + (1 if r < extra else 0) for r in range(rows)]


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """Class-balanced sampling, usable with a plain ``torch.utils.data.DataLoader``.

    Each step takes the annotated class seen least so far (ties at random), a crop annotating
    it, and a random sample of that crop. Draws are made by the engine from ``seed`` and the
    epoch (which advances at every iteration; ``set_epoch`` chooses it), so runs are
    reproducible.

    ``dataset`` is a CellMap dataset, multi-dataset or split combination, or any dataset that
    answers ``get_crop_class_matrix()`` (bool ``[rows, classes]``) and ``__len__``: the rows are
    its parts when it is a concatenation (``datasets`` + ``cumulative_sizes``), its samples when
    there is one row per sample, and otherwise even parts of its index range.
    """

    def __init__(self, dataset: Any, samples_per_epoch: int | None = None, seed: int = 42) -> None:
        self.dataset = dataset
        self.multi: Any = None
        if getattr(dataset, "as_multi", None) is not None and not isinstance(dataset, torch.utils.data.Subset):
            self.multi = dataset.as_multi()
            self._sizes = [len(d) for d in self.multi.datasets]
            self._annotated: list[list[bool]] = []
        elif hasattr(dataset, "get_crop_class_matrix") and hasattr(dataset, "__len__"):
            import numpy as np

            matrix = np.asarray(dataset.get_crop_class_matrix(), dtype=bool)
            if matrix.ndim != 2:
                raise ConfigError(f"get_crop_class_matrix() must return a [rows, classes] matrix, not shape {list(matrix.shape)}")
            self._sizes = _rows_of(dataset, matrix.shape[0])
            self._annotated = matrix.tolist()
        else:
            raise ConfigError(
                f"ClassBalancedSampler needs a dataset with get_crop_class_matrix() and __len__, not {type(dataset).__name__}")
        total = sum(self._sizes)
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch is not None else total
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Chooses the epoch the next iteration draws."""
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> list[_PLAN]:
        """The (row, index in row, stream) plan of an epoch."""
        from . import _engine

        e = self.epoch if epoch is None else epoch
        if self.multi is not None:
            return self.multi.engine_collection().plan_balanced(self.samples_per_epoch, self.seed, e)
        return _engine.balanced_plan(self._sizes, self._annotated, self.samples_per_epoch, self.seed, e)

    def __iter__(self) -> Iterator[int]:
        plan = self.plan()
        self.epoch += 1
        starts = [0]
        for n in self._sizes[:-1]:
            starts.append(starts[-1] + n)
        return iter([starts[d] + i for d, i, _ in plan])

    def __len__(self) -> int:
        return self.samples_per_epoch


class _Stream:
    """Copies batches to the device on a side stream so the copy of batch k+1 overlaps the
    consumer's work on batch k; a no-op path on CPU so both run the same code."""

    def __init__(self, device: torch.device | None) -> None:
        self.cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.side = torch.cuda.Stream(device=device) if self.cuda else None

    def context(self) -> Any:
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def upload(self, batch: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Starts copying one tensor column to the device. On CUDA the engine's threads copy it
        into page-locked memory (one thread's ``pin_memory`` copy caps delivery on many-core
        machines), then the upload runs asynchronously on the side stream."""
        if not self.cuda:
            return tensor.to(self.device)
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        batch.copy_tensor_into(name, pinned.view(torch.uint8).numpy())
        return pinned.to(self.device, non_blocking=True)

    def copied(self) -> Any:
        """An event marking the copies queued so far (None on CPU)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def hand_over(self, event: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Makes the consumer's stream wait for these copies only (not for later ones), and
        tells the allocator the tensors are used there, so their memory is not reused by a
        later copy on the side stream while the consumer still reads them."""
        if event is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for tensor in tensors.values():
            tensor.record_stream(consumer)


class CellMapDataLoader:
    """Loads batches of ``{"idx", <input>: [B, 1, ...], <target>: [B, n_classes, ...]}``.

    ``num_workers`` is the number of engine threads (0: one per core); nothing is pickled and no
    worker process is started. ``iterations_per_epoch`` counts batches. Every iteration draws a
    new epoch (``refresh()`` does the same explicitly). Under ``torch.distributed`` (or with
    ``rank``/``world_size``) each rank reads a disjoint shard of every epoch.
    Extra keyword arguments of torch's DataLoader (``pin_memory``, ``prefetch_factor``,
    ``persistent_workers``, ``shuffle``, ``drop_last``...) are accepted; ``prefetch_factor``
    sets the prefetch depth, ``drop_last`` is honoured, the rest have no meaning here.
    The older ``tensorstore_cache_bytes`` sets the byte budget of the engine's shared chunk cache.

    With ``return_metadata=True`` each batch also carries ``"__metadata__"``: one dict per
    sample (see :func:`cellmap_data.dataset.sample_metadata_dicts`). ``loader[indices]`` reads
    the given dataset indices as one batch (the older library's indexing).

    ``on_read_error`` decides what a sample whose read fails (a corrupt or unreadable chunk, an
    I/O error) does during an epoch: ``"raise"`` (default) raises it, naming the path and the
    sample; ``"retry"`` reads again after 50, 100, 200, 400 and 800 ms when the error is
    transient (EIO, EAGAIN, a timeout, an interrupted call) and raises if it persists;
    ``"skip"`` replaces the sample by another sample of the same dataset drawn from the seed
    (the same seed gives the same replacements at any thread count; the batch's metadata is the
    replacement's). Retries and skips warn once per failing path
    (:class:`~cellmap_data.exceptions.ReadErrorWarning`) and are counted by :meth:`stats`.
    """

    def __init__(
        self,
        dataset: Any,
        classes: Sequence[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        weighted_sampler: bool = False,
        sampler: Any = None,
        is_train: bool = True,
        rng: Any = None,
        device: str | torch.device | None = None,
        iterations_per_epoch: int | None = None,
        *,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        return_metadata: bool = False,
        worker_shard: tuple[int, int] | None = None,
        on_read_error: str = "raise",
        **kwargs: Any,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        if iterations_per_epoch is not None and int(iterations_per_epoch) < 1:
            raise ConfigError(f"iterations_per_epoch must be at least 1, not {iterations_per_epoch}")
        self.dataset = dataset
        self.multi, self.subset = as_multi(dataset)
        if len(self.multi) == 0 or (self.subset is not None and not self.subset):
            raise ConfigError("the dataset has no samples to load (check pad, array shapes and crops)")
        self.classes = list(classes) if classes is not None else list(self.multi.classes)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.weighted_sampler = bool(weighted_sampler)
        #: The sampler the caller passed (a ``Sampler``, any iterable of indices, or a callable
        #: returning one), or None; :attr:`sampler` is what frameworks read.
        self.user_sampler = sampler
        self.is_train = bool(is_train)
        self.iterations_per_epoch = int(iterations_per_epoch) if iterations_per_epoch is not None else None
        if self.iterations_per_epoch is not None and self.weighted_sampler and self.is_train and self.batch_size > 1:
            # The reference's current release reads iterations_per_epoch *samples* with the
            # weighted sampler; here an epoch is that many batches.
            warn_reference_difference(
                "iterations_per_epoch",
                f"iterations_per_epoch={self.iterations_per_epoch} counts batches here: an epoch reads "
                f"{self.iterations_per_epoch} batches of {self.batch_size} samples "
                f"({self.iterations_per_epoch * self.batch_size} samples), where the reference cellmap-data "
                f"2026.3 release read {self.iterations_per_epoch} samples. Pass "
                f"iterations_per_epoch={max(1, self.iterations_per_epoch // self.batch_size)} for the same amount of work.",
            )
        self.device = resolve_device(device)
        self.seed = _seed_of(rng, seed, self.multi)
        self._rank_arg, self._world_arg = rank, world_size
        self.return_metadata = bool(return_metadata)
        self.worker_shard = worker_shard or (0, 1)
        if not 0 <= self.worker_shard[0] < self.worker_shard[1]:
            raise ConfigError(f"worker_shard {worker_shard} must be (worker id, number of workers)")
        cache_bytes = kwargs.pop("tensorstore_cache_bytes", None)
        if cache_bytes is not None:
            from . import _engine

            _engine.set_cache_budget(int(cache_bytes))
        self.drop_last = bool(kwargs.pop("drop_last", False))
        prefetch = kwargs.pop("prefetch_factor", None)
        self.prefetch = max(2, int(prefetch)) if prefetch else 2
        self.loader_kwargs = kwargs  # accepted for compatibility (pin_memory, persistent_workers...)
        if on_read_error not in READ_ERROR_POLICIES:
            raise ConfigError(f"on_read_error must be one of {', '.join(map(repr, READ_ERROR_POLICIES))}, not {on_read_error!r}")
        self.on_read_error = on_read_error
        self._read_counts = {"retried": 0, "skipped": 0}
        self._read_incidents: list[dict[str, Any]] = []
        self._batch_number = 0
        self._reported_paths: set[str] = set()
        self.epoch = 0
        # What the current (or last) iteration delivered: its epoch, its batch count, and the
        # metadata of batches whose samples were replaced (the rest is the epoch's plan).
        self._consumed_epoch = 0
        self._consumed_batches = 0
        self._replaced_metadata: dict[int, Any] = {}
        # Per delivered batch of the current iteration: its per-class target counts.
        self._delivered_counts: dict[int, Any] = {}
        self._weights: dict[str, float] | None = None
        # Where the next batch comes from: (epoch, batches of it already delivered).
        self._position = (0, 0)
        self._epoch_batches = 0
        # A restored state's (epoch, batches delivered): that epoch starts after them.
        self._resume: tuple[int, int] | None = None
        # A user sampler's indices per epoch, drawn once so len(), the plan and the metadata of
        # an epoch all describe the same draw (a few recent epochs kept).
        self._drawn: dict[int, list[int]] = {}
        self._collection = None
        self._collection_key: tuple | None = None

    # -- sizes ----------------------------------------------------------------------------
    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)`` this loader shards epochs for: the ``rank`` / ``world_size``
        given, else those of an initialised ``torch.distributed`` group, else ``(0, 1)``. Read
        when asked, so a process group initialised after the loader was built counts; a rank
        outside the world raises :class:`~cellmap_data.exceptions.ConfigError`."""
        return distributed_context(self._rank_arg, self._world_arg)

    @property
    def threads(self) -> int:
        """Engine threads reading batches."""
        return self.num_workers if self.num_workers > 0 else (os.cpu_count() or 1)

    def epoch_shape(self, epoch: int | None = None) -> dict[str, int]:
        """How ``epoch`` (default: the one being read, or else the next) divides on this rank,
        as the engine plans it: ``planned`` samples (all ranks), ``per_rank``, ``padding``
        (repeats of the plan's first samples so every rank reads as many; marked in the
        ``padding`` metadata column), ``dropped`` (cut with ``drop_last``), ``batches`` (per
        rank) and ``worker_batches`` / ``worker_samples`` (this reader's share)."""
        e = self._position[0] if epoch is None else int(epoch)
        return dict(self.collection().epoch_shape(json.dumps(self.epoch_settings(e))))

    def __len__(self) -> int:
        """Batches in an epoch on this rank: the same on every rank (see :meth:`epoch_shape`)."""
        return self.epoch_shape()["worker_batches"]

    @property
    def sampler(self) -> Any:
        """The sampler passed in, or else an :class:`EpochSampler` over this rank's samples of
        the epoch (what training frameworks read from a loader)."""
        return self.user_sampler if self.user_sampler is not None else EpochSampler(self)

    @property
    def batch_sampler(self) -> "EpochBatchSampler":
        """This rank's batches of the epoch as lists of sample indices (an :class:`EpochBatchSampler`)."""
        return EpochBatchSampler(self)

    def set_epoch(self, epoch: int) -> None:
        """Chooses the epoch the next iteration reads (as torch's ``DistributedSampler.set_epoch``;
        training frameworks call it through :attr:`sampler`). A restored mid-epoch state is kept
        when it is for this epoch."""
        epoch = int(epoch)
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = epoch
        self._position = (epoch, self._resume[1] if self._resume is not None else 0)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, for a mid-epoch resume (the ``state_dict`` /
        ``load_state_dict`` protocol of torchdata's ``StatefulDataLoader``, which Lightning saves in
        its checkpoints): the epoch, the batches of it already delivered, the seed, and with a
        sampler of the caller's, its indices for that epoch and its own state (``state_dict()``, or
        its torch ``generator``'s state) so later epochs draw as an uninterrupted run does. A
        sampler drawing from torch's global random state (e.g. ``RandomSampler`` without a
        generator) resumes its epoch exactly; its later epochs depend on that global state."""
        epoch, delivered = self._position
        state: dict[str, Any] = {"epoch": epoch, "batches_delivered": delivered, "seed": self.seed,
                                 "batch_size": self.batch_size}
        sampler = self.user_sampler
        if sampler is not None:
            state["sampler_indices"] = list(self._given_indices(epoch))
            if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
                state["sampler_state"] = sampler.state_dict()
            elif isinstance(getattr(sampler, "generator", None), torch.Generator):
                state["sampler_generator"] = sampler.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`: the next iteration reads that epoch from the first batch
        not yet delivered, exactly the batches an uninterrupted run reads from there."""
        try:
            epoch, delivered, seed = int(state["epoch"]), int(state["batches_delivered"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a CellMapDataLoader state: {e!r} in {sorted(state) if isinstance(state, Mapping) else state!r}") from None
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ConfigError(f"the state was saved with batch_size={state['batch_size']}, this loader has {self.batch_size}")
        self.seed = seed
        if "sampler_indices" in state:
            self._drawn = {epoch: [int(i) for i in state["sampler_indices"]]}
        if "sampler_state" in state:
            self.user_sampler.load_state_dict(state["sampler_state"])
        if "sampler_generator" in state:
            self.user_sampler.generator.set_state(state["sampler_generator"])
        self._resume = (epoch, delivered) if delivered > 0 else None
        self.epoch = epoch
        self._position = (epoch, delivered)

    @property
    def loader(self) -> "CellMapDataLoader":
        """The iterable of batches (this object; kept for code written for the torch-based loader)."""
        return self

    # -- planning -------------------------------------------------------------------------
    def collection(self) -> Any:
        """The engine collection over the loader's datasets (rebuilt when they change or after a fork)."""
        key = (os.getpid(),) + tuple(id(d.engine) for d in self.multi.datasets)
        if self._collection is None or key != self._collection_key:
            self._collection = self.multi.engine_collection()
            self._collection_key = key
        return self._collection

    def _given_indices(self, epoch: int) -> list[int]:
        """The user sampler's indices (into the multi-dataset) for ``epoch``, drawn once."""
        drawn = self._drawn.get(epoch)
        if drawn is None:
            user = self.user_sampler
            sampler = user() if callable(user) and not hasattr(user, "__iter__") else user
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            try:
                drawn = [int(i) for i in iter(sampler)]
            except TypeError as e:
                raise ConfigError(f"sampler {type(sampler).__name__} must yield sample indices (ints): {e}") from None
            if self.subset is not None:
                try:
                    drawn = [self.subset[i] for i in drawn]
                except IndexError:
                    raise ConfigError(f"sampler index out of range for the {len(self.subset)} samples of the subset") from None
            self._drawn = {e: v for e, v in self._drawn.items() if abs(e - epoch) <= 1}
            self._drawn[epoch] = drawn
        return drawn

    def epoch_settings(self, epoch: int) -> dict[str, Any]:
        """Everything that decides ``epoch``'s batches on this rank and worker, as the engine takes
        it: the engine plans the epoch from this alone (its size and every random decision from
        its keyed streams; nothing counted, shuffled or sliced here)."""
        rank, world = self.rank_and_world_size
        source: dict[str, Any]
        if self.user_sampler is not None:
            source = {"kind": "given", "indices": self._given_indices(epoch)}
        elif self.subset is not None:
            source = {"kind": "subset", "indices": list(self.subset), "shuffle": self.is_train}
        elif self.weighted_sampler and self.is_train:
            source = {"kind": "balanced"}
        else:
            source = {"kind": "uniform", "shuffle": self.is_train}
        worker, workers = self.worker_shard
        return {
            "source": source, "batch_size": self.batch_size, "drop_last": self.drop_last,
            "iterations": self.iterations_per_epoch, "rank": rank, "world_size": world, "worker": worker,
            "workers": workers, "seed": self.seed, "epoch": int(epoch), "on_read_error": self.on_read_error,
        }

    def plan_epoch(self, epoch: int) -> list[list[_PLAN]]:
        """The batches this rank reads in ``epoch``: lists of (dataset, index, stream)."""
        return [[tuple(p) for p in batch] for batch in self.collection().epoch_plan(json.dumps(self.epoch_settings(epoch)))]

    @property
    def last_plan(self) -> list[list[_PLAN]]:
        """The batches of the last epoch iterated (planned again on request)."""
        return self.plan_epoch(self.epoch - 1) if self.epoch > 0 else []

    def refresh(self) -> None:
        """Draws a new epoch for the next iteration (every iteration already does)."""
        self._collection = None

    # -- iteration ------------------------------------------------------------------------
    def _begin_epoch(self) -> tuple[int, Any]:
        """Starts the next epoch: its number and the engine's stream of it (planned and read by
        the engine in one call), after the batches a restored state says were delivered."""
        epoch = self.epoch
        self.epoch += 1
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        settings = json.dumps(self.epoch_settings(epoch))
        collection = self.collection()
        self._epoch_batches = collection.epoch_shape(settings)["worker_batches"]
        stream = collection.epoch_stream(settings, threads=self.threads, prefetch=self.prefetch, augment=self.is_train,
                                         start=start)
        self._batch_number = start
        self._consumed_epoch, self._consumed_batches, self._replaced_metadata = epoch, start, {}
        self._delivered_counts = {}
        self._position = (epoch, start)
        return epoch, stream

    def _delivered(self) -> None:
        """One more batch of the epoch delivered; after its last, the next batch is the next
        epoch's first (also when the consumer stops there without ending the loop)."""
        self._consumed_batches += 1
        done = self._consumed_batches >= self._epoch_batches
        self._position = (self._consumed_epoch + 1, 0) if done else (self._consumed_epoch, self._consumed_batches)

    def _end_epoch(self) -> None:
        """The epoch was read to its end: the next batch is the next epoch's first."""
        self._position = (self._consumed_epoch + 1, 0)

    def iter_arrow(self) -> Iterator[Any]:
        """Yields the engine's batches as ``pyarrow.RecordBatch`` (tensor columns + metadata)."""
        import pyarrow as pa

        _, stream = self._begin_epoch()
        try:
            for batch in stream:
                self._note_incidents(batch)
                self._delivered_counts[self._consumed_batches] = batch.class_tallies()
                self._delivered()
                yield pa.record_batch(batch.record_batch())
            self._end_epoch()
        finally:
            stream.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _, stream = self._begin_epoch()
        mover = _Stream(self.device)
        ahead: dict[str, Any] | None = None
        current: dict[str, Any] | None = None
        batch: Any = None
        try:
            for batch in stream:
                self._note_incidents(batch)
                current = self._prepare(batch, mover)
                if ahead is not None:
                    yield self._finish(ahead, mover)
                ahead = current
            if ahead is not None:
                yield self._finish(ahead, mover)
            self._end_epoch()
        finally:
            # A traceback keeps this frame alive: it must not keep batches alive with it.
            ahead = current = batch = None
            stream.close()

    def _note_incidents(self, batch: Any) -> None:
        """Counts the batch's retried and skipped reads; warns once per failing path."""
        for position, action, dataset, index, centre, message in batch.incidents:
            self._read_counts[action] += 1
            if len(self._read_incidents) < MAX_KEPT_INCIDENTS:
                self._read_incidents.append({"epoch": self._consumed_epoch, "batch": self._batch_number,
                                             "position": position, "action": action,
                                             "dataset": dataset, "index": index, "centre": tuple(centre),
                                             "message": message})
            path = message.split(": ", 1)[0]
            if path not in self._reported_paths:
                self._reported_paths.add(path)
                warnings.warn(f"on_read_error={self.on_read_error!r}: {action} a read of {message}", ReadErrorWarning,
                              stacklevel=3)
        self._batch_number += 1

    def stats(self) -> dict[str, Any]:
        """Read errors handled so far by ``on_read_error``: ``retried`` (transient errors read
        again) and ``skipped`` (samples replaced) counts, and the incidents (epoch, batch number
        in the epoch, position in the batch, action, the failed sample's dataset, index and
        centre, message; the first 10 000 are kept)."""
        return {**self._read_counts, "incidents": list(self._read_incidents)}

    def _prepare(self, batch: Any, mover: _Stream) -> dict[str, Any]:
        """Starts moving a batch to the device (on the side stream) and keeps what finishing needs."""
        tensors = {name: torch.from_dlpack(batch.tensor(name)) for name in batch.tensor_names}
        if self.device is not None:
            with mover.context():
                tensors = {k: mover.upload(batch, k, v) for k, v in tensors.items()}
        return {"tensors": tensors, "batch": batch, "copied": mover.copied()}

    def _finish(self, pending: dict[str, Any], mover: _Stream) -> dict[str, Any]:
        """Applies value transforms (on the target device) and assembles the batch dict."""
        batch, tensors = pending["batch"], pending["tensors"]
        mover.hand_over(pending["copied"], tensors)
        # Straight from the engine's batch: the hot path converts no record batch.
        seeds = torch.tensor(batch.value_seeds, dtype=torch.int64)
        positions = batch.positions
        out: dict[str, Any] = {"idx": torch.tensor([self.multi.offset(d) + i for d, i in zip(positions, batch.indices)], dtype=torch.int64)}
        owners = [self.multi.datasets[d] for d in positions]
        for name, tensor in tensors.items():
            tensor = to_axis_order_by_owner(name, expand_compact(tensor), owners)
            out[name] = apply_value_transforms_by_owner(name, tensor, seeds, owners)
        if self.return_metadata:
            import pyarrow as pa

            out["__metadata__"] = sample_metadata_dicts(pa.record_batch(batch.metadata()), batch.tensor_names, owners)
        if any(action == "skipped" for _, action, *_ in batch.incidents):
            self._replaced_metadata[self._consumed_batches] = batch.metadata()
        self._delivered_counts[self._consumed_batches] = batch.class_tallies()
        self._delivered()
        return out

    def __getitem__(self, indices: int | Sequence[int]) -> dict[str, Any]:
        """The samples ``indices`` (indices into ``dataset``) read now as one collated batch,
        on the loader's device (the older library's ``loader[idx]``)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        if isinstance(indices, int) or not isinstance(indices, Sequence):
            indices = [int(indices)]
        items = []
        for index in indices:
            g = self.subset[int(index)] if self.subset is not None else int(index)
            d, i = self.multi.locate(g)
            item = self.multi.datasets[d].get_batch([i], return_metadata=self.return_metadata)
            item["idx"] = torch.tensor([g], dtype=torch.int64)
            items.append(item)
        out: dict[str, Any] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
        if self.device is not None:
            out = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    def metadata(self, batch: Any) -> Any:
        """The per-sample metadata of an engine batch as a polars DataFrame."""
        import polars as pl

        return pl.DataFrame(batch.metadata())

    def epoch_metadata(self, epoch: int | None = None) -> Any:
        """The sample metadata of a whole epoch (default: the one the next iteration reads) as
        one polars DataFrame, without reading any voxel: ``batch`` (this rank's batch number),
        then the plan's columns of every batch (``dataset``, ``crop``, ``idx``, ``centre_*``,
        ``mirror_*``, ``transpose_*``, ``rotate_*``, ``level_<array>``, ``value_seed``,
        ``padding``, and per class ``annotated_<class>``), and per class ``weight_<class>``, the
        weight the dataset's ``class_weights`` gives it (the same for every sample). The engine
        draws exactly these samples when that epoch is iterated. docs/metadata.md lists every
        column."""
        import polars as pl

        e = self.epoch if epoch is None else int(epoch)
        frame = pl.DataFrame(self.collection().epoch_metadata(json.dumps(self.epoch_settings(e)), augment=self.is_train))
        return frame.with_columns(self._weight_columns())

    def _weight_columns(self) -> list[Any]:
        """``weight_<class>`` columns: the class weights of the loader's datasets (computed once)."""
        import polars as pl

        if self._weights is None:
            weights = self.multi.class_weights
            self._weights = {c: float(weights.get(c, float("nan"))) for c in self.multi.classes}
        return [pl.lit(w, dtype=pl.Float64).alias(f"weight_{c}") for c, w in self._weights.items()]

    def consumed_metadata(self) -> Any:
        """The sample metadata of the batches the current (or last) iteration has delivered so
        far, as one polars DataFrame: the columns of :meth:`epoch_metadata` (a replaced sample,
        with ``on_read_error="skip"``, shows its replacement), then what the delivered targets
        held, per class: ``foreground_<class>`` (voxels above 0 after the spatial transforms),
        ``fraction_<class>`` (of the target patch) and ``unknown_<class>`` (NaN share), counted by
        the engine as it wrote them (null for batches delivered before a restored state)."""
        import polars as pl

        planned = self.epoch_metadata(self._consumed_epoch)
        frame = planned.filter(pl.col("batch") < self._consumed_batches)
        for number, record in self._replaced_metadata.items():
            delivered = pl.DataFrame(record).with_columns(pl.lit(number, dtype=planned.schema["batch"]).alias("batch"))
            frame = pl.concat([frame.filter(pl.col("batch") != number), delivered.select(planned.columns)])
        frame = frame.sort("batch", maintain_order=True)
        if not self._delivered_counts:
            return frame
        position = pl.int_range(pl.len()).over("batch").alias("_position")
        counts = pl.concat([pl.DataFrame(record).with_columns(pl.lit(number, dtype=planned.schema["batch"]).alias("batch"))
                            for number, record in sorted(self._delivered_counts.items())], how="vertical_relaxed")
        joined = frame.with_columns(position).join(counts.with_columns(position), on=["batch", "_position"], how="left")
        return joined.drop("_position")

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellMapDataLoader":
        """Delivers batches on ``device`` from now on."""
        self.device = resolve_device(device)
        return self

    @staticmethod
    def collate_fn(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stacks per-sample dicts into a batch (``__metadata__`` kept as a list)."""
        out: dict[str, Any] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return out

    def __repr__(self) -> str:
        from .presentation.display import loader_text

        return loader_text(self)

    def _repr_html_(self) -> str:
        from .presentation.display import loader_html

        return loader_html(self)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A loader's samples of one epoch on this rank, as a torch sampler: iterating yields the
    sample indices (into the loader's multi-dataset, as in the batches' ``idx``) of the epoch the
    next iteration reads, in order, padding repeats included; ``len()`` counts them;
    ``set_epoch`` chooses the epoch (frameworks call it at every epoch). A view: the engine owns
    the plan, nothing is drawn here."""

    def __init__(self, loader: CellMapDataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[int]:
        return (index for batch in EpochBatchSampler(self.loader) for index in batch)

    def __len__(self) -> int:
        return self.loader.epoch_shape()["worker_samples"]

    def set_epoch(self, epoch: int) -> None:
        """Chooses the epoch the loader's next iteration reads."""
        self.loader.set_epoch(epoch)

    @property
    def shuffle(self) -> bool:
        """Whether the epoch's order is drawn at random (training) rather than fixed."""
        return self.loader.is_train and self.loader.user_sampler is None


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """A loader's batches of one epoch on this rank as lists of sample indices (see
    :class:`EpochSampler`), with the ``sampler``, ``batch_size`` and ``drop_last`` a torch
    ``BatchSampler`` has; ``len()`` equals ``len(loader)``."""

    def __init__(self, loader: CellMapDataLoader) -> None:
        self.loader = loader

    @property
    def sampler(self) -> EpochSampler:
        return EpochSampler(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def drop_last(self) -> bool:
        return self.loader.drop_last

    def __iter__(self) -> Iterator[list[int]]:
        loader = self.loader
        epoch = loader._position[0]
        for batch in loader.plan_epoch(epoch):
            yield [loader.multi.offset(d) + i for d, i, _ in batch]

    def __len__(self) -> int:
        return len(self.loader)


class CellMapIterableDataset(torch.utils.data.IterableDataset):
    """Batches as a torch ``IterableDataset``: use ``torch.utils.data.DataLoader(it,
    batch_size=None)``. With torch workers, each worker reads a disjoint shard of every epoch
    (and, under ``torch.distributed``, of its rank's share), so no sample is duplicated.

    Each iteration is one epoch (``epoch`` advances; call ``set_epoch`` to choose it, as with
    torch's DistributedSampler).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, **loader_kwargs: Any) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.loader_kwargs = dict(loader_kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch drawn by the next iteration."""
        self.epoch = int(epoch)

    def _loader(self) -> CellMapDataLoader:
        """This rank's loader, restricted to this torch worker's share of the batches."""
        info = torch.utils.data.get_worker_info()
        kwargs = dict(self.loader_kwargs)
        if info is not None:
            kwargs["worker_shard"] = (info.id, info.num_workers)
            kwargs.setdefault("num_workers", 1)  # one engine thread per torch worker process
        return CellMapDataLoader(self.dataset, batch_size=self.batch_size, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = self._loader()
        loader.epoch = self.epoch
        self.epoch += 1
        yield from loader

    def __len__(self) -> int:
        return len(self._loader())

    def epoch_metadata(self, epoch: int | None = None) -> Any:
        """The sample metadata of an epoch (default: the next) of this process's share, as one
        polars DataFrame, without reading voxels (see :meth:`CellMapDataLoader.epoch_metadata`)."""
        return self._loader().epoch_metadata(self.epoch if epoch is None else epoch)
