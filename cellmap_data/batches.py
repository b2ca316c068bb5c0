"""Engine batches → torch: the one place the datasets and the loader turn what the engine read
into the tensors a training loop gets (compact targets expanded, each dataset's axis order, the
torch share of the value transforms, per-sample metadata dicts)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ._config import SHEAR_TERMS, SPATIAL_AXES
from .transforms.augment._common import owned_batch
from .transforms.plan import ValuePlan
from .transforms.seeding import sample_seeds

__all__ = [
    "apply_value_transforms_by_owner",
    "expand_compact",
    "run_torch_rest",
    "sample_metadata_dicts",
    "to_axis_order_by_owner",
]


def expand_compact(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 compact targets (0, 1, 255 = unknown) → float32 with NaN, on the tensor's device.

    Moving uint8 and expanding on the GPU moves 4× less memory than shipping float32."""
    if tensor.dtype != torch.uint8:
        return tensor
    out = tensor.to(torch.float32)
    return out.masked_fill_(tensor == 255, float("nan"))


def sample_metadata_dicts(record: Any, tensor_names: Sequence[str], owners: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-sample ``"__metadata__"`` dicts of an engine batch: the engine's metadata columns
    (``dataset``, ``crop``, ``idx`` within the dataset, ``centre_*``, ``mirror_*``,
    ``transpose_*``, ``rotate_*``, ``scale_*``, ``shear_*``, ``elastic_*``, ``level_<array>``, ``value_seed``,
    ``padding``) plus the keys of the
    reference library's metadata: ``raw_path``, ``target_path_str``, ``current_idx``,
    ``current_center`` (``{axis: nm}``) and ``current_spatial_transforms`` (the drawn transform
    in the form :meth:`CellMapImage.set_spatial_transforms` takes, so a sample can be re-read)."""
    rows = record.drop_columns([n for n in tensor_names if n in record.column_names]).to_pylist()
    for row, owner in zip(rows, owners):
        row["raw_path"] = owner.raw_path
        row["target_path_str"] = owner.target_path
        row["current_idx"] = row.get("idx")
        row["current_center"] = {a: row.get(f"centre_{a}") for a in SPATIAL_AXES}
        drawn: dict[str, Any] = {}
        mirrored = [a for a in SPATIAL_AXES if row.get(f"mirror_{a}")]
        if mirrored:
            drawn["mirror"] = mirrored
        order = [row.get(f"transpose_{a}") for a in SPATIAL_AXES]
        if all(isinstance(o, int) for o in order) and order != [0, 1, 2]:
            drawn["transpose"] = [SPATIAL_AXES[o] for o in order]
        angles = {a: row.get(f"rotate_{a}") for a in SPATIAL_AXES if row.get(f"rotate_{a}")}
        if angles:
            drawn["rotate"] = angles
        zoom = {a: row[f"scale_{a}"] for a in SPATIAL_AXES if row.get(f"scale_{a}", 1.0) != 1.0}
        if zoom:
            drawn["scale"] = zoom
        shear = {t: row[f"shear_{t}"] for t in SHEAR_TERMS if row.get(f"shear_{t}", 0.0) != 0.0}
        if shear:
            drawn["shear"] = shear
        sigma = [row.get(f"elastic_sigma_{a}", 0.0) for a in SPATIAL_AXES]
        if any(sigma):
            drawn["elastic"] = {"seed": row["elastic_seed"], "jitter_sigma": sigma,
                                "control_point_spacing": [row[f"elastic_spacing_{a}"] for a in SPATIAL_AXES]}
        row["current_spatial_transforms"] = drawn
    return rows


def _sample_seed(seed: int, salt: str, source: int) -> int:
    """A torch seed for one sample's call of a foreign transform (stable across processes)."""
    payload = f"{seed}:{salt}:{source}".encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def run_torch_rest(plan: ValuePlan, tensor: torch.Tensor, seeds: torch.Tensor, salt: str, reference_shape: Sequence[int]) -> torch.Tensor:
    """Runs the torch share of a value-transform plan on a batch ``[B, C, *spatial]``.

    Batch-aware transforms run once on the whole batch, every random draw keyed per sample
    (:func:`sample_seeds`). Any other callable is called the reference library's way: once per
    sample and per channel (source), on the patch's own shape with its singleton axes
    (``reference_shape``), torch's global RNG seeded from that sample's seed around the call
    (and restored after), so each sample gets its own reproducible draw."""
    rest = plan.torch_rest
    if rest is None:
        return tensor
    if plan.rest_batch_aware:
        # The batch is ours alone (fresh from the engine): the project's transforms may change it
        # in place instead of allocating.
        with owned_batch(tensor), sample_seeds(seeds, salt=salt):
            return rest(tensor)
    devices = [tensor.device] if tensor.device.type == "cuda" else []
    out = torch.empty_like(tensor)
    for i, seed in enumerate(seeds.tolist()):
        for c in range(tensor.shape[1]):
            patch = tensor[i, c].reshape(list(reference_shape))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_sample_seed(int(seed), salt, c))
                result = rest(patch)
            out[i, c] = torch.as_tensor(result, device=tensor.device).reshape(tensor.shape[2:])
    return out


def to_axis_order_by_owner(name: str, tensor: torch.Tensor, owners: list[Any]) -> torch.Tensor:
    """Each sample's tensor in its own dataset's ``axis_order`` (datasets of one loader may
    differ; the shapes must then agree, as for a cubic patch)."""
    orders = {owner.axis_order for owner in owners}
    if len(orders) == 1:
        return owners[0].to_axis_order(tensor, name)
    rows: dict[str, list[int]] = {}
    first: dict[str, Any] = {}
    for row, owner in enumerate(owners):
        rows.setdefault(owner.axis_order, []).append(row)
        first.setdefault(owner.axis_order, owner)
    result = torch.empty_like(tensor)
    for order, members in rows.items():
        index = torch.tensor(members, device=tensor.device)
        result[index] = first[order].to_axis_order(tensor[index], name)
    return result


def apply_value_transforms_by_owner(name: str, tensor: torch.Tensor, seeds: torch.Tensor, owners: list[Any]) -> torch.Tensor:
    """Applies the torch share of each sample's dataset's value transforms of array ``name``, once
    per group of samples whose datasets share their transforms."""
    groups: dict[Any, list[int]] = {}
    keyed: dict[Any, Any] = {}
    for row, owner in enumerate(owners):
        key = owner.value_transform_key(name)
        groups.setdefault(key, []).append(row)
        keyed[key] = owner
    if len(groups) == 1:
        return owners[0].apply_value_transforms(name, tensor, seeds)
    result = tensor.clone()
    for key, rows in groups.items():
        index = torch.tensor(rows, device=tensor.device)
        result[index] = keyed[key].apply_value_transforms(name, tensor[index], seeds[rows])
    return result
