"""Training-framework jobs for tests/test_frameworks.py, run as their own processes: the loaders
are built the way the segmentation challenge's ``get_dataloader`` builds them (a split from the
datasplit CSV, validation blocks unshuffled, weighted training batches), and each rank writes
what it saw to ``OUT/<job>-rank<r>.json``.

usage:
  framework_job.py lightning CSV OUT DEVICES [STRATEGY [PACKAGE]]
                                                 Lightning fit + validate + predict (DDP or
                                                 ddp_spawn when DEVICES > 1: Lightning starts the
                                                 other ranks; PACKAGE pytorch_lightning or
                                                 lightning.pytorch)
  framework_job.py accelerate CSV OUT            under torchrun: accelerate's prepare loop with
                                                 gather_for_metrics, then a plain validation loop
                                                 with one all_reduce per batch (batch sizes 1
                                                 and 3)
  framework_job.py overwrite RAW IMAGE OUT       under torchrun: a prediction written to IMAGE
                                                 with overwrite=True over an older output
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

CLASSES = ["mito", "er"]
SHAPE = (4, 16, 16)  # 25 validation blocks in the tiny split: divides by neither 2 nor 3
ARRAYS_IN = {"input": {"shape": SHAPE, "scale": (8, 8, 8)}}
ARRAYS_OUT = {"output": {"shape": SHAPE, "scale": (8, 8, 8)}}
TRAIN_BATCHES = 6


def split(csv: str) -> Any:
    import torchvision.transforms.v2 as T

    from cellmap_data import CellMapDataSplit
    from cellmap_data.transforms.augment import Binarize, NaNtoNum

    raw = T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])
    return CellMapDataSplit(
        input_arrays=ARRAYS_IN, target_arrays=ARRAYS_OUT, classes=CLASSES, pad=True, csv_path=csv,
        train_raw_value_transforms=raw, val_raw_value_transforms=raw,
        target_value_transforms=T.Compose([T.ToDtype(torch.float), Binarize(0.5)]),
        spatial_transforms={"mirror": {"axes": {"x": 0.5}}, "rotate": {"axes": {"z": [-180, 180]}}},
        class_relation_dict={"mito": ["er"], "er": ["mito"]},
    )


def loaders(csv: str, batch_size: int = 2) -> tuple[Any, Any]:
    """(train, validation) as the challenge toolbox makes them."""
    from cellmap_data import CellMapDataLoader

    datasplit = split(csv)
    val = CellMapDataLoader(datasplit.validation_blocks, classes=CLASSES, batch_size=batch_size, is_train=False,
                            num_workers=1, return_metadata=True)
    train = CellMapDataLoader(datasplit.train_datasets_combined, classes=CLASSES, batch_size=batch_size,
                              iterations_per_epoch=TRAIN_BATCHES, weighted_sampler=True, is_train=True, num_workers=1,
                              seed=3, return_metadata=True)
    return train, val


def samples(batch: dict[str, Any]) -> list[list[Any]]:
    """(idx, value seed, padding) per sample of a batch: the seed names the planned position."""
    return [[int(i), int(m["value_seed"]), bool(m["padding"])] for i, m in zip(batch["idx"], batch["__metadata__"])]


def write(out: str, name: str, rank: int, record: dict[str, Any]) -> None:
    with open(os.path.join(out, f"{name}-rank{rank}.json"), "w") as f:
        json.dump(record, f)


def masked_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(target)
    return torch.nn.functional.binary_cross_entropy_with_logits(prediction[known], target[known])


def _model_class(pl: Any) -> Any:
    class Model(pl.LightningModule):
        """A tiny 3D model that records the samples of each step in ``seen`` (and, with ``out``,
        writes its rank's training samples there when a fit ends: the spawned ranks of
        ``ddp_spawn`` hold their own copy)."""

        def __init__(self, out: str | None = None) -> None:
            super().__init__()
            self.net = torch.nn.Conv3d(1, len(CLASSES), 3, padding=1)
            self.out = out
            self.seen: dict[str, list] = {"train": [], "val": [], "validate": [], "predict": []}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x / 255)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            self.seen["train"].append(samples(batch))
            loss = masked_loss(self(batch["input"]), batch["output"])
            self.log("train/loss", loss, sync_dist=True, batch_size=batch["input"].shape[0])
            return loss

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            key = "validate" if self.trainer.state.fn == "validate" else "val"
            self.seen[key].append(samples(batch))
            # One all-reduce per batch: ranks with unequal batch counts would wait forever here.
            loss = masked_loss(self(batch["input"]), batch["output"])
            self.log("val/loss", loss, sync_dist=True, batch_size=batch["input"].shape[0])

        def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            self.seen["predict"].append(samples(batch))
            return self(batch["input"]).sigmoid().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_fit_end(self) -> None:
            if self.out is not None:
                write(self.out, "fit", self.global_rank, {"train": self.seen["train"], "val": self.seen["val"]})

    return Model


try:  # at module level, so the ranks that ddp_spawn starts (and unpickle the model in) find it
    import pytorch_lightning as _pl

    Model = _model_class(_pl)
    Model.__qualname__ = "Model"
except ImportError:  # pragma: no cover - a dev dependency
    Model = None


def lightning_module(pl: Any, out: str | None = None) -> Any:
    cls = Model if pl.__name__ == "pytorch_lightning" else _model_class(pl)
    return cls(out)


def trainer(pl: Any, out: str, devices: int = 1, strategy: str = "ddp", **kwargs: Any) -> Any:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy if devices > 1 else "auto", max_epochs=2,
                      num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=out, **kwargs)


def lightning(csv: str, out: str, devices: int, strategy: str = "ddp", package: str = "pytorch_lightning") -> dict[str, Any]:
    """Fit (2 epochs), validate and predict; returns (and writes) what this rank saw. With
    ``ddp_spawn`` only the spawned ranks see batches: they write their fit's samples."""
    import importlib

    pl = importlib.import_module(package)
    train, val = loaders(csv)
    model = lightning_module(pl, out if strategy == "ddp_spawn" else None)
    seen = model.seen
    run = trainer(pl, out, devices, strategy, enable_checkpointing=False)
    if strategy == "ddp_spawn":
        run.fit(model, train, val)
        return {}
    run.fit(model, train, val)
    run.validate(model, val, verbose=False)
    run.predict(model, val, return_predictions=False)
    record = {"lengths": {"train": len(train), "val": len(val)}, "padding": val.epoch_shape()["padding"],
              "world_size": run.world_size, **seen}
    write(out, "lightning", run.global_rank, record)
    return record


def lightning_fit(csv: str, out: str, package: str, ckpt_path: str | None = None, every: int | None = None) -> list:
    """The training samples of a 2-epoch fit (resumed from ``ckpt_path``), checkpointing every
    ``every`` steps into ``out``."""
    import importlib

    pl = importlib.import_module(package)
    train, val = loaders(csv)
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=every, save_top_k=-1)] if every else []
    run = trainer(pl, out, callbacks=callbacks, enable_checkpointing=bool(every))
    model = lightning_module(pl)
    run.fit(model, train, val, ckpt_path=ckpt_path)
    return model.seen["train"]


def accelerate(csv: str, out: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Conv3d(1, len(CLASSES), 3, padding=1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    train, val = loaders(csv)
    model, optimiser, train, val = accelerator.prepare(model, optimiser, train, val)
    rank = accelerator.process_index
    record: dict[str, Any] = {"train": [], "val_steps": 0, "gathered": [], "lengths": {"train": len(train), "val": len(val)}}
    for batch in train:
        record["train"].append(samples(batch))
        loss = masked_loss(model(batch["input"] / 255), batch["output"])
        accelerator.backward(loss)
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    with torch.no_grad():
        for batch in val:
            record["val_steps"] += 1
            score = model(batch["input"] / 255).sigmoid().flatten(1).mean(1)
            idx, padding, _ = accelerator.gather_for_metrics(
                (batch["idx"], torch.tensor([m["padding"] for m in batch["__metadata__"]]), score))
            record["gathered"] += [[int(i), bool(p)] for i, p in zip(idx, padding)]
    # A plain loop as a torchrun script writes it: one all_reduce per validation batch.
    for batch_size in (1, 3):
        _, plain = loaders(csv, batch_size=batch_size)
        steps = 0
        for batch in plain:
            total = batch["input"].new_tensor([batch["input"].shape[0]])
            dist.all_reduce(total)
            steps += 1
        record[f"allreduce_steps_b{batch_size}"] = [steps, len(plain)]
    write(out, "accelerate", rank, record)


def predict_into(writer: Any) -> None:
    """A fixed "model" over every tile the writer hands this rank."""
    for batch in writer.loader(batch_size=4):
        x = batch["raw"]
        writer[batch["idx"]] = {"pred": torch.cat([x / 255, 1 - x / 255], dim=1)}
    writer.close(timeout=120)


WRITER_ARRAYS = ({"raw": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, {"pred": {"shape": (8, 8, 8), "scale": (8, 8, 8)}})


def overwrite(raw: str, image: str, out: str) -> None:
    import torch.distributed as dist

    from cellmap_data import CellMapDatasetWriter

    dist.init_process_group("gloo")
    writer = CellMapDatasetWriter(raw, image, CLASSES, *WRITER_ARRAYS, overwrite=True)
    predict_into(writer)
    write(out, "overwrite", dist.get_rank(), {"tiles": len(writer.writer_indices), "of": len(writer)})
    dist.destroy_process_group()


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    if job == "lightning":
        lightning(args[0], args[1], int(args[2]), *args[3:])
    elif job == "accelerate":
        accelerate(args[0], args[1])
    elif job == "overwrite":
        overwrite(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown job {job!r}")
