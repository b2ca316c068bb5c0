"""Where each value transform runs: in the engine, skipped, or in torch.

A dataset hands its value transforms (one callable, usually a ``torchvision`` ``Compose``, or one
per class) to :func:`plan_value_transforms`. The transforms the engine knows, taken from the
front of the pipeline, become engine ops applied to every patch on the engine's threads
(:class:`ValuePlan.engine_ops`); those that cannot change what reaches them (``ToDtype(float32)``
on the engine's float32, ``Binarize()`` on labels that are already 0/1/NaN) are skipped; the
first transform the engine does not know and everything after it stay in torch
(:attr:`ValuePlan.torch_rest`), called on the whole batch when every one of them is batch-aware,
else once per sample and per source on the reference library's shapes.

``ValuePlan.describe()`` lists each transform with where it runs; dataset reprs show it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .augment import Binarize, GaussianBlur, GaussianNoise, NaNtoNum, Normalize, RandomContrast, RandomGamma
from .augment._common import ValueTransform

__all__ = ["ValuePlan", "is_batch_aware", "plan_value_transforms", "flatten_transforms"]

ENGINE = "engine"
SKIPPED = "skipped (identity)"
TORCH_BATCH = "torch (whole batch)"
TORCH_SAMPLE = "torch (per sample)"


@dataclass
class ValuePlan:
    """How one value-transform pipeline is executed (see the module docstring)."""

    engine_ops: list[dict[str, Any]] = field(default_factory=list)
    torch_rest: Callable[[torch.Tensor], torch.Tensor] | None = None
    rest_batch_aware: bool = True
    where: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> list[tuple[str, str]]:
        """``(transform, where it runs)`` for every transform of the pipeline, in order."""
        return list(self.where)

    @property
    def is_identity(self) -> bool:
        """Whether nothing at all runs."""
        return not self.engine_ops and self.torch_rest is None


def flatten_transforms(transform: Any) -> list[Any]:
    """The transforms of a (possibly nested) torchvision ``Compose``, or ``[transform]``."""
    if transform is None:
        return []
    inner = getattr(transform, "transforms", None)
    if _is_compose(transform) and isinstance(inner, (list, tuple)):
        out: list[Any] = []
        for t in inner:
            out.extend(flatten_transforms(t))
        return out
    return [transform]


def _is_compose(transform: Any) -> bool:
    cls = type(transform)
    return cls.__name__ == "Compose" and cls.__module__.startswith("torchvision.transforms")


def _torchvision_name(transform: Any) -> str | None:
    """The class name of a torchvision transform (v1 or v2), else None."""
    module = type(transform).__module__
    return type(transform).__name__ if module.startswith("torchvision.transforms") else None


def is_batch_aware(transform: Any) -> bool:
    """Whether a transform gives each sample of a batch what it would give that sample alone:
    the project's transforms (random ones draw per sample inside ``sample_seeds``), dtype
    conversions, and any object that declares ``batch_aware = True``."""
    if getattr(transform, "batch_aware", False) is True or isinstance(transform, ValueTransform):
        return True
    return _torchvision_name(transform) in ("ToDtype", "ConvertImageDtype", "Identity")


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _scalar(values: Any) -> float | None:
    """A single number from a scalar or a one-element sequence/tensor, else None."""
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (list, tuple)):
        if len(values) != 1:
            return None
        values = values[0]
    try:
        return float(values)
    except (TypeError, ValueError):
        return None


def _engine_op(transform: Any, binary: bool) -> tuple[str, dict[str, Any] | None]:
    """(where, op) for one transform given whether its input is 0/1/NaN; ``where`` is None-like
    ("") when the engine does not know the transform."""
    cls = type(transform)
    name = _torchvision_name(transform)
    if name in ("ToDtype", "ConvertImageDtype"):
        dtype = getattr(transform, "dtype", None)
        # The engine delivers float32; converting float32 to float32 changes nothing (torchvision
        # returns same-dtype input unchanged, with or without scale).
        return (SKIPPED, None) if dtype is torch.float32 else ("", None)
    if name == "Identity":
        return SKIPPED, None
    if name == "Normalize":
        mean, std = _scalar(getattr(transform, "mean", None)), _scalar(getattr(transform, "std", None))
        if mean is None or std is None or std == 0:
            return "", None
        return ENGINE, {"op": "standardize", "mean": mean, "std": std}
    if cls is Binarize:
        threshold = float(transform.threshold)
        if binary and 0.0 <= threshold < 1.0:
            return SKIPPED, None
        return ENGINE, {"op": "binarize", "threshold": threshold}
    if cls is NaNtoNum:
        params = dict(transform.params)
        if set(params) - {"nan", "posinf", "neginf"}:
            return "", None
        nan = params.get("nan")
        if nan is not None and not math.isfinite(float(nan)):
            return "", None
        if any(params.get(k) is not None and not math.isfinite(float(params[k])) for k in ("posinf", "neginf")):
            return "", None  # an infinite replacement cannot cross as JSON; torch does it
        return ENGINE, {
            "op": "nan_to_num",
            "nan": 0.0 if nan is None else float(nan),
            "posinf": _finite_or_none(params.get("posinf")),
            "neginf": _finite_or_none(params.get("neginf")),
        }
    if cls is Normalize:
        return ENGINE, {"op": "shift_scale", "shift": float(transform.shift), "scale": float(transform.scale)}
    if cls is GaussianNoise:
        return ENGINE, {"op": "gaussian_noise", "mean": transform.mean, "std": transform.std}
    if cls is RandomContrast:
        low, high = transform.contrast_range
        return ENGINE, {"op": "random_contrast", "low": low, "high": high}
    if cls is RandomGamma:
        low, high = transform.gamma_range
        return ENGINE, {"op": "random_gamma", "low": low, "high": high}
    if cls is GaussianBlur:
        return ENGINE, {"op": "gaussian_blur", "kernel_size": transform.kernel_size, "sigma": transform.sigma, "dims": transform.dim}
    return "", None


def _compose(transforms: Sequence[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(transforms) == 1:
        return transforms[0]
    import torchvision.transforms.v2 as T

    return T.Compose(list(transforms))


def plan_value_transforms(transform: Any, *, binary: bool = False, engine: bool = True) -> ValuePlan:
    """Splits ``transform`` into engine ops, skipped identities and a torch rest.

    Args:
        transform: one callable (a ``Compose`` is looked into) or None.
        binary: the values reaching it are 0, 1 or NaN (label targets).
        engine: whether the engine may run anything (False: everything stays in torch, e.g. for
            compact uint8 targets, which are expanded on the device).
    """
    plan = ValuePlan()
    steps = flatten_transforms(transform)
    for position, t in enumerate(steps):
        where, op = _engine_op(t, binary) if engine else ("", None)
        if not where:
            rest = steps[position:]
            plan.torch_rest = _compose(rest)
            plan.rest_batch_aware = all(is_batch_aware(r) for r in rest)
            kind = TORCH_BATCH if plan.rest_batch_aware else TORCH_SAMPLE
            plan.where.extend((repr(r), kind) for r in rest)
            break
        plan.where.append((repr(t), where))
        if op is not None:
            plan.engine_ops.append(op)
            binary = op["op"] == "binarize"
    return plan
