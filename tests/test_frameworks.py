"""Training frameworks run the loaders unchanged: PyTorch Lightning (single process and DDP, both
package names), accelerate's prepare loop, plain torchrun loops with one all-reduce per batch;
ranks read disjoint training samples and the same number of batches; validation covers every
block once (padding repeats marked); a resumed run delivers what an uninterrupted one does.

The jobs live in ``framework_job.py`` and run as their own processes (torchrun or Lightning's
DDP launcher); a job that hangs fails its test at the timeout."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import framework_job as job

JOB = Path(__file__).with_name("framework_job.py")
VALIDATION_BLOCKS = 25  # the tiny split's blocks at framework_job.SHAPE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(args: list[str], cwd: Path, nproc: int | None = None, timeout: float = 240) -> None:
    """Runs a job (under torchrun with ``nproc`` ranks); a job still running at ``timeout`` (a
    collective waiting forever) is killed with its ranks and fails the test."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    process = subprocess.Popen([*launcher, str(JOB), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{args[0]} job still running after {timeout} s (a rank waiting forever):\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]


def ranks(out: Path, name: str, world: int) -> list[dict]:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(world)]


def flat(batches: list[list[list]]) -> list[list]:
    return [sample for batch in batches for sample in batch]


def covers_every_block_once(per_rank: list[list[list]]) -> int:
    """Checks that the ranks' validation samples are every block once plus marked repeats of
    blocks; returns the number of repeats."""
    read = [s for samples in per_rank for s in samples]
    originals = sorted(s[0] for s in read if not s[2])
    assert len(originals) == VALIDATION_BLOCKS == len(set(originals))
    repeats = [s[0] for s in read if s[2]]
    assert set(repeats) <= set(originals)
    return len(repeats)


@pytest.fixture(scope="module")
def csv(tiny_data) -> str:
    return str(tiny_data.csv_path)


# -- what Lightning reads from a loader ----------------------------------------------------------
@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_lightning_reads_the_loader_without_crashing_or_rewrapping_it(csv, package):
    pl = importlib.import_module(package)
    data = importlib.import_module(package + ".utilities.data")
    fabric = importlib.import_module(package.replace("pytorch_lightning", "lightning_fabric").replace(".pytorch", ".fabric")
                                     + ".utilities.data")
    train, val = job.loaders(csv)
    assert data._is_dataloader_shuffled(val) is False
    assert data._is_dataloader_shuffled(train) is False  # not a RandomSampler: Lightning adds no warning
    # Lightning's distributed-sampler injection only touches torch DataLoaders: ours is left alone.
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert trainer._data_connector._prepare_dataloader(train, shuffle=True, mode=None) is train
    for loader in (train, val):
        assert loader.batch_sampler.batch_size == loader.batch_size
        assert loader.batch_sampler.drop_last is loader.drop_last is False
        assert len(loader.batch_sampler) == len(loader) and loader.num_workers == 1
        assert loader.dataset is not None
    # set_epoch through the sampler (what Lightning's loops call) chooses the epoch read next.
    fabric._set_sampler_epoch(train, 5)
    assert train.epoch == 5
    planned = list(train.batch_sampler)
    delivered = [b["idx"].tolist() for b in train]
    assert delivered == planned and len(delivered) == len(train) == job.TRAIN_BATCHES
    assert len(train.sampler) == sum(map(len, planned)) == list(train.sampler).__len__()
    combined = importlib.import_module(package + ".utilities.combined_loader").CombinedLoader(
        {"train": train, "val": val}, mode="max_size_cycle")
    iter(combined)
    assert len(combined) == len(val)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_lightning_fit_validate_and_predict_in_one_process(csv, tmp_path, package):
    seen = job.lightning(csv, str(tmp_path), 1, package=package)
    assert len(seen["train"]) == 2 * job.TRAIN_BATCHES
    assert [len(b) for b in seen["validate"]] == [2] * 12 + [1]
    assert covers_every_block_once([flat(seen["validate"])]) == 0
    assert flat(seen["predict"]) == flat(seen["validate"])
    assert len(seen["val"]) == 2 * len(seen["validate"])  # once per epoch
    epochs = [flat(seen["train"][:job.TRAIN_BATCHES]), flat(seen["train"][job.TRAIN_BATCHES:])]
    assert epochs[0] != epochs[1], "each epoch draws anew"


def test_lightning_ddp_ranks_read_disjoint_samples_and_equal_batches(csv, tmp_path):
    run_job(["lightning", csv, str(tmp_path), "2"], tmp_path)
    seen = ranks(tmp_path, "lightning", 2)
    assert [r["world_size"] for r in seen] == [2, 2]
    for stage in ("train", "val", "validate", "predict"):
        assert len(seen[0][stage]) == len(seen[1][stage]), stage
    assert seen[0]["lengths"] == seen[1]["lengths"] == {"train": job.TRAIN_BATCHES, "val": 7}
    # Planned positions (value seeds) of the two ranks' training samples never coincide.
    positions = [{(s[0], s[1]) for s in flat(r["train"])} for r in seen]
    assert len(positions[0]) == len(positions[1]) == 2 * job.TRAIN_BATCHES * 2 and not positions[0] & positions[1]
    repeats = covers_every_block_once([flat(r["validate"]) for r in seen])
    assert repeats == seen[0]["padding"] == 1  # 25 blocks on 2 ranks: 13 each
    assert covers_every_block_once([flat(r["predict"]) for r in seen]) == 1


def test_lightning_ddp_spawn_pickles_the_loaders_to_ranks_that_read_disjoint_samples(csv, tmp_path):
    run_job(["lightning", csv, str(tmp_path), "2", "ddp_spawn"], tmp_path)
    seen = ranks(tmp_path, "fit", 2)
    assert [len(r["train"]) for r in seen] == [2 * job.TRAIN_BATCHES] * 2
    assert len(seen[0]["val"]) == len(seen[1]["val"]) == 2 * 7
    positions = [{(s[0], s[1]) for s in flat(r["train"])} for r in seen]
    assert not positions[0] & positions[1]
    assert covers_every_block_once([flat(r["val"][:7]) for r in seen]) == 1


def test_a_pickled_loader_reads_what_the_original_reads(csv):
    import pickle

    train, _ = job.loaders(csv)
    copy = pickle.loads(pickle.dumps(train))
    assert [b["idx"].tolist() for b in copy] == [b["idx"].tolist() for b in train]


# -- accelerate and plain torchrun loops -----------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_accelerate_prepare_loop_and_all_reduce_per_batch_finish_on_every_rank(csv, tmp_path, world):
    run_job(["accelerate", csv, str(tmp_path)], tmp_path, nproc=world)
    seen = ranks(tmp_path, "accelerate", world)
    assert {len(r["train"]) for r in seen} == {job.TRAIN_BATCHES}
    positions = [{(s[0], s[1]) for s in flat(r["train"])} for r in seen]
    assert sum(map(len, positions)) == len(set().union(*positions)), "ranks read disjoint training samples"
    per_rank = -(-VALIDATION_BLOCKS // world)
    steps = -(-per_rank // 2)
    assert {r["val_steps"] for r in seen} == {steps} and {r["lengths"]["val"] for r in seen} == {steps}
    gathered = seen[0]["gathered"]
    assert len(gathered) == per_rank * world
    assert sorted(i for i, padding in gathered if not padding) == sorted({i for i, _ in gathered})
    assert sum(padding for _, padding in gathered) == per_rank * world - VALIDATION_BLOCKS
    for batch_size in (1, 3):
        # Batch sizes 1 and 3 over 25 tiles: every rank takes len() steps and none waits forever.
        assert {tuple(r[f"allreduce_steps_b{batch_size}"]) for r in seen} == {(-(-per_rank // batch_size),) * 2}


def test_torchrun_overwrite_clears_the_old_output_on_rank_0_then_every_rank_writes(tiny_data, tmp_path):
    from cellmap_data import CellMapDatasetWriter

    raw = str(tiny_data.datasets[0].raw_path)
    image = tmp_path / "pred.zarr" / "pred"
    # An older output with another layout (16³ tiles and chunks) that the new job could not write into.
    old = CellMapDatasetWriter(raw, str(image), job.CLASSES, {"raw": {"shape": (16, 16, 16), "scale": (8, 8, 8)}},
                               {"pred": {"shape": (16, 16, 16), "scale": (8, 8, 8)}})
    for batch in old.loader(batch_size=4):
        old[batch["idx"]] = {"pred": torch.full((batch["raw"].shape[0], 2, 16, 16, 16), 7.0)}
    old.close()
    run_job(["overwrite", raw, str(image), str(tmp_path)], tmp_path, nproc=2)
    seen = ranks(tmp_path, "overwrite", 2)
    assert sum(r["tiles"] for r in seen) >= seen[0]["of"] and all(r["tiles"] < r["of"] for r in seen)
    one = tmp_path / "one.zarr" / "pred"
    job.predict_into(CellMapDatasetWriter(raw, str(one), job.CLASSES, *job.WRITER_ARRAYS))
    for c in job.CLASSES:
        written, expected = zarr.open_array(str(image / c / "s0"), mode="r"), zarr.open_array(str(one / c / "s0"), mode="r")
        assert written.chunks == (8, 8, 8)
        np.testing.assert_array_equal(written[...], expected[...])


def test_overwrite_with_ranks_but_no_process_group_keeps_its_clear_error(tiny_data, tmp_path, monkeypatch):
    from cellmap_data import CellMapDatasetWriter
    from cellmap_data.exceptions import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="init_process_group"):
        CellMapDatasetWriter(str(tiny_data.datasets[0].raw_path), str(tmp_path / "p.zarr" / "p"), job.CLASSES,
                             *job.WRITER_ARRAYS, overwrite=True)
    assert not (tmp_path / "p.zarr").exists()


# -- resuming mid-epoch ------------------------------------------------------------------------------
def test_lightning_resumes_mid_epoch_from_a_checkpoint_with_the_batches_it_would_have_read(csv, tmp_path):
    package = "pytorch_lightning"
    whole = job.lightning_fit(csv, str(tmp_path / "run"), package, every=4)
    assert len(whole) == 2 * job.TRAIN_BATCHES
    for step in (4, 8):  # mid epoch 0, and mid epoch 1
        ckpt = next((tmp_path / "run").glob(f"*step={step}.ckpt"))
        state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert state[0]["batches_delivered"] == step % job.TRAIN_BATCHES
        resumed = job.lightning_fit(csv, str(tmp_path / f"resumed{step}"), package, ckpt_path=str(ckpt))
        assert resumed == whole[step:]
