"""Deterministic synthetic data laid out exactly like CellMap's OME-NGFF Zarr volumes.

The generator builds a small "world" per dataset: a few cells (large ellipsoids
whose rim is the plasma membrane and whose outside is extracellular space) that
hold non-overlapping organelles (nucleus, mitochondria, ER sheets, vesicles),
all placed in physical (nanometre) coordinates.  Both the EM-like raw image and
every ground-truth crop are rendered from that one world, each on its own voxel
grid, so raw and labels agree wherever they overlap and a model can learn the
mapping.  Membranes render dark, mitochondria carry cristae stripes, and the
background is a smooth grey field with white noise on top.

On disk, each dataset looks like a real CellMap container::

    <out>/<name>.zarr/recon-1/em/fibsem-uint8/{s0,s1,s2}
    <out>/<name>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/{s0,s1}
    <out>/datasplit.csv

with OME-NGFF 0.4 ``multiscales`` (zarr v2) or 0.5 ``ome`` metadata (zarr v3)
and CellMap ``cellmap.annotation`` attributes.  Everything is a pure function of
``seed``: the same seed gives byte-identical arrays.

Run ``python -m cellmap_data synth OUT_DIR`` for the command-line version.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "SIZE_PRESETS",
    "SyntheticCrop",
    "SyntheticData",
    "SyntheticDataset",
    "make_many_crops_data",
    "make_synthetic_data",
]

#: The class vocabulary, in the order used for the ``[a,b]`` lists of the datasplit CSV.
CLASS_NAMES: tuple[str, ...] = ("ecs", "pm", "mito", "er", "nuc", "ves")

#: Named sizes: raw s0 edge length (voxels) of the isotropic dataset, and the chunk edge.
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (80, 32),
    "small": (128, 32),
    "bench": (640, 64),
}

RAW_GROUP = "recon-1/em/fibsem-uint8"
GROUNDTRUTH_GROUP = "recon-1/labels/groundtruth"
RAW_LEVELS = 3
LABEL_LEVELS = 2

# Integer codes of the rendered label volume: 0 is cytosol (no class), class i is i + 1.
_CYTOSOL = 0
_CODE = {name: index + 1 for index, name in enumerate(CLASS_NAMES)}

# Grey values of the raw image (uint8).  Membranes are dark, as in CellMap's FIB-SEM.
_CYTOSOL_GREY = 150.0
_BACKGROUND_FIELD_SIGMA = 10.0
_NOISE_SIGMA = 8.0
_ECS_OFFSET = 28.0
_PM_DARKENING = 85.0
_INTERIOR_OFFSET = {"nuc": -22.0, "er": -18.0, "mito": -30.0, "ves": 18.0}
_MEMBRANE_DARKENING = {"nuc": 60.0, "er": 70.0, "mito": 70.0, "ves": 65.0}
_CRISTAE_DARKENING = 28.0

# Raw-voxel budget of one rendering pass: keeps float32 temporaries to tens of MB.
_VOXELS_PER_PASS = 4_000_000


@dataclass(frozen=True)
class _CropSpec:
    """One crop of a dataset pattern; its extent is a fraction of the raw extent."""

    voxel_size: tuple[float, float, float]
    extent_fraction: tuple[float, float, float]


@dataclass(frozen=True)
class _DatasetPattern:
    raw_voxel_size: tuple[float, float, float]
    z_shape_factor: float  # fewer (thicker) z slices for the anisotropic pattern
    random_origin: bool  # place raw voxel 0 away from the world origin
    crops: tuple[_CropSpec, ...]


# Datasets cycle through these patterns: isotropic 4 nm raw with 4 nm and 8 nm crops,
# then anisotropic (5.24, 4, 4) nm raw with crops at the same anisotropic voxel size.
_PATTERNS: tuple[_DatasetPattern, ...] = (
    _DatasetPattern(
        raw_voxel_size=(4.0, 4.0, 4.0),
        z_shape_factor=1.0,
        random_origin=False,
        crops=(
            _CropSpec((4.0, 4.0, 4.0), (0.40, 0.45, 0.50)),
            _CropSpec((4.0, 4.0, 4.0), (0.50, 0.40, 0.30)),
            _CropSpec((8.0, 8.0, 8.0), (0.60, 0.60, 0.60)),
        ),
    ),
    _DatasetPattern(
        raw_voxel_size=(5.24, 4.0, 4.0),
        z_shape_factor=0.8,
        random_origin=True,
        crops=(
            _CropSpec((5.24, 4.0, 4.0), (0.375, 0.40, 0.40)),
            _CropSpec((5.24, 4.0, 4.0), (0.45, 0.50, 0.45)),
        ),
    ),
)
# The many-crop layout (make_many_crops_data): 8 nm isotropic raw with five crops of about 150³
# voxels at 8 nm (a 512³ volume), the second for validation, the others for training.
_MANY_CROPS_PATTERN = _DatasetPattern(
    raw_voxel_size=(8.0, 8.0, 8.0),
    z_shape_factor=1.0,
    random_origin=False,
    crops=tuple(
        _CropSpec((8.0, 8.0, 8.0), fractions)
        for fractions in ((0.30, 0.29, 0.28), (0.25, 0.25, 0.25), (0.28, 0.30, 0.29), (0.29, 0.28, 0.30), (0.30, 0.30, 0.29))
    ),
)
_MANY_CROPS_PER_VOLUME = 4

# Within each dataset, the crop at this index goes to "validate", the others to "train".
_VALIDATE_CROP_INDEX = 1

# Independent random streams, so that e.g. the geometry of dataset i does not depend
# on how many datasets are generated or on how its raw volume is sliced for writing.
_WORLD_STREAM, _NOISE_STREAM, _CROP_STREAM, _ANNOTATION_STREAM = range(4)


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


# ----------------------------------------------------------------------------- results


@dataclass
class SyntheticCrop:
    """One ground-truth crop.  Geometry is that of scale level s0, axes (z, y, x), nm."""

    name: str
    path: Path
    classes: list[str]
    voxel_size: tuple[float, float, float]
    shape: tuple[int, int, int]
    translation: tuple[float, float, float]
    target_path: str
    usage: str = "train"
    instance_classes: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    """Annotated classes with no foreground voxel at s0 (annotated, but absent)."""


@dataclass
class SyntheticDataset:
    """One ``<name>.zarr`` container: its raw pyramid and its crops."""

    name: str
    zarr_path: Path
    raw_path: Path
    raw_voxel_size: tuple[float, float, float]
    raw_shape: tuple[int, int, int]
    raw_translation: tuple[float, float, float]
    crops: list[SyntheticCrop]


@dataclass
class SyntheticData:
    """Everything :func:`make_synthetic_data` wrote."""

    root: Path
    csv_path: Path
    datasets: list[SyntheticDataset]
    classes: list[str]

    @property
    def crops(self) -> list[SyntheticCrop]:
        """All crops of all datasets, in CSV order."""
        return [crop for dataset in self.datasets for crop in dataset.crops]


# ----------------------------------------------------------------------------- geometry


def _fibonacci_directions(count: int) -> np.ndarray:
    """``count`` roughly evenly spread unit vectors, shape (count, 3)."""
    i = np.arange(count) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / count)
    azimuth = math.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=1)


_SURFACE_DIRECTIONS = _fibonacci_directions(400)
_CONTAINMENT_DIRECTIONS = _fibonacci_directions(300)


@dataclass
class _Ellipsoid:
    """A rotated ellipsoid in world coordinates (nm, zyx)."""

    class_name: str  # "cell" for a cell, else a name from CLASS_NAMES
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # columns are the principal axes
    ordinal: int = 0  # 1-based index among the world's objects of the same class

    def __post_init__(self) -> None:
        # Maps a world offset from the centre to coordinates in which the ellipsoid
        # is the unit ball.
        self.to_unit = (self.rotation / self.radii).T
        self.half_extent = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1))
        self.lo = self.centre - self.half_extent
        self.hi = self.centre + self.half_extent
        self.bounding_radius = float(self.radii.max())
        self.min_radius = float(self.radii.min())

    def unit_norm(self, point: np.ndarray) -> float:
        """Norm of ``point`` in unit-ball coordinates (< 1 means inside)."""
        return float(np.linalg.norm(self.to_unit @ (point - self.centre)))

    def surface_points(self, directions: np.ndarray) -> np.ndarray:
        """Surface points along the given unit directions of the local frame, shape (n, 3)."""
        return self.centre + directions @ (self.rotation * self.radii).T

    def contains(self, inner: "_Ellipsoid", margin: float) -> bool:
        """Whether ``inner`` lies inside, at least about ``margin`` nm from the surface.

        A point whose unit-frame norm is <= 1 - margin / r_min has its whole
        margin-ball inside (the unit-frame map stretches by at most 1 / r_min);
        ``inner``'s surface is tested at sampled points.
        """
        centre_norm = self.unit_norm(inner.centre)
        if centre_norm >= 1.0:
            return False
        reach = 1.0 - margin / self.min_radius
        if centre_norm + inner.bounding_radius / self.min_radius <= reach:
            return True  # even the bounding ball fits: no need to sample
        points = inner.surface_points(_CONTAINMENT_DIRECTIONS)
        norms = np.linalg.norm((points - self.centre) @ self.to_unit.T, axis=1)
        return bool(np.all(norms <= reach))

    def intersects_box(self, lo: np.ndarray, hi: np.ndarray) -> bool:
        return bool(np.all(self.lo <= hi) and np.all(self.hi >= lo))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix, from a random unit quaternion."""
    quaternion = rng.standard_normal(4)
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


class _SpatialHash:
    """Buckets of placed organelles, for fast non-overlap tests while scattering them."""

    def __init__(self, bucket_size: float) -> None:
        self.bucket_size = bucket_size
        self.buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self.objects: list[_Ellipsoid] = []
        self.centres = np.empty((0, 3))
        self.radii = np.empty(0)

    def _key(self, point: np.ndarray) -> tuple[int, ...]:
        return tuple(int(v) for v in np.floor(point / self.bucket_size))

    def collides(self, candidate: _Ellipsoid, gap: float) -> bool:
        """Needs the bucket size to be at least twice the largest bounding radius."""
        kz, ky, kx = self._key(candidate.centre)
        near = [
            i
            for dz in (-1, 0, 1)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            for i in self.buckets.get((kz + dz, ky + dy, kx + dx), ())
        ]
        if not near:
            return False
        # Vectorised bounding-ball test first; the exact-ish test only for the close ones.
        distances = np.linalg.norm(self.centres[near] - candidate.centre, axis=1)
        close = np.flatnonzero(distances < self.radii[near] + candidate.bounding_radius + gap)
        return any(_ellipsoids_overlap(candidate, self.objects[near[i]], gap) for i in close)

    def add(self, obj: _Ellipsoid) -> None:
        self.buckets[self._key(obj.centre)].append(len(self.objects))
        self.objects.append(obj)
        if len(self.objects) > len(self.radii):  # grow the arrays geometrically
            capacity = max(64, 2 * len(self.radii))
            self.centres = np.resize(self.centres, (capacity, 3))
            self.radii = np.resize(self.radii, capacity)
        self.centres[len(self.objects) - 1] = obj.centre
        self.radii[len(self.objects) - 1] = obj.bounding_radius


@dataclass
class _SmoothField:
    """Trilinear interpolation of a coarse random lattice: a seamless low-frequency texture."""

    origin: np.ndarray
    spacing: float
    values: np.ndarray  # (Cz, Cy, Cx) float32
    _plane_cache: tuple | None = field(default=None, init=False, repr=False)

    def _weights(self, axis: int, coords: np.ndarray) -> np.ndarray:
        n_nodes = self.values.shape[axis]
        position = (coords - self.origin[axis]) / self.spacing
        index = np.clip(np.floor(position).astype(np.int64), 0, n_nodes - 2)
        frac = np.clip(position - index, 0.0, 1.0).astype(np.float32)
        weights = np.zeros((len(coords), n_nodes), np.float32)
        rows = np.arange(len(coords))
        weights[rows, index] = 1.0 - frac
        weights[rows, index + 1] = frac
        return weights

    def sample(self, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray) -> np.ndarray:
        planes = self._planes(yc, xc)
        cz = self.values.shape[0]
        along_z = self._weights(0, zc) @ planes.reshape(cz, -1)
        return along_z.reshape(len(zc), len(yc), len(xc))

    def _planes(self, yc: np.ndarray, xc: np.ndarray) -> np.ndarray:
        """The lattice interpolated in y and x, (Cz, ny, nx); slabs of one volume share it."""
        cached = self._plane_cache
        if cached is not None and np.array_equal(cached[0], yc) and np.array_equal(cached[1], xc):
            return cached[2]
        along_x = self.values @ self._weights(2, xc).T  # (Cz, Cy, nx)
        planes = np.stack([self._weights(1, yc) @ plane for plane in along_x])  # (Cz, ny, nx)
        self._plane_cache = (yc.copy(), xc.copy(), planes)
        return planes


class _ObjectIndex:
    """Ellipsoids with their bounding boxes stacked, for vectorised culling."""

    def __init__(self, objects: list[_Ellipsoid]) -> None:
        self.objects = objects
        self.lo = np.array([o.lo for o in objects]).reshape(-1, 3)
        self.hi = np.array([o.hi for o in objects]).reshape(-1, 3)

    def overlapping(self, lo: np.ndarray, hi: np.ndarray) -> list[_Ellipsoid]:
        hits = np.flatnonzero(np.all(self.lo <= hi, axis=1) & np.all(self.hi >= lo, axis=1))
        return [self.objects[i] for i in hits]


@dataclass
class _World:
    box_lo: np.ndarray  # raw volume bounds (voxel edges), nm
    box_hi: np.ndarray
    cells: list[_Ellipsoid]
    organelles: list[_Ellipsoid]
    pm_thickness: float
    membrane_width: float
    background: _SmoothField

    def __post_init__(self) -> None:
        self.cell_index = _ObjectIndex(self.cells)
        self.organelle_index = _ObjectIndex(self.organelles)

    def remove_organelles(self, doomed: list[_Ellipsoid]) -> None:
        doomed_ids = {id(o) for o in doomed}
        self.organelles = [o for o in self.organelles if id(o) not in doomed_ids]
        self.organelle_index = _ObjectIndex(self.organelles)


def _build_world(
    rng: np.random.Generator,
    box_lo: np.ndarray,
    box_hi: np.ndarray,
    raw_voxel_size: np.ndarray,
) -> _World:
    extent = box_hi - box_lo
    box_size = float(extent.min())
    # Organelle sizes follow the box up to a cap, so that big volumes hold many
    # organelles of realistic size rather than a few huge ones.
    feature = min(box_size, 800.0)
    voxel = float(raw_voxel_size.max())
    pm_thickness = 3.0 * float(raw_voxel_size.min())
    membrane_width = 1.25 * float(raw_voxel_size.min())

    cells = _place_cells(rng, box_lo, box_hi, box_size)
    organelles = _place_organelles(rng, cells, box_lo, box_hi, feature, voxel, pm_thickness)

    spacing = max(64.0, 16.0 * float(raw_voxel_size.min()))
    n_nodes = tuple(int(math.ceil(e / spacing)) + 3 for e in extent)
    background = _SmoothField(
        origin=box_lo - spacing,
        spacing=spacing,
        values=(rng.standard_normal(n_nodes) * _BACKGROUND_FIELD_SIGMA).astype(np.float32),
    )
    return _World(box_lo, box_hi, cells, organelles, pm_thickness, membrane_width, background)


def _ellipsoids_overlap(a: _Ellipsoid, b: _Ellipsoid, gap: float) -> bool:
    """Whether ``a`` and ``b`` come closer than about ``gap``.

    Bounding and inscribed balls settle most cases; otherwise both surfaces are
    sampled: if two ellipsoids intersect (or one holds the other), some surface
    point of one lies inside the other.
    """
    distance = float(np.linalg.norm(a.centre - b.centre))
    if distance >= a.bounding_radius + b.bounding_radius + gap:
        return False
    if distance < a.min_radius + b.min_radius:
        return True
    for this, other in ((a, b), (b, a)):
        points = this.surface_points(_SURFACE_DIRECTIONS)
        norms = np.linalg.norm((points - other.centre) @ other.to_unit.T, axis=1)
        if np.any(norms < 1.0 + gap / other.min_radius):
            return True
    return False


def _place_cells(
    rng: np.random.Generator, box_lo: np.ndarray, box_hi: np.ndarray, box_size: float
) -> list[_Ellipsoid]:
    """Big, separated cells, added until they cover about 75 % of the box.

    The first sits near the middle of the box; the rest fill in around it and
    usually stick out of the box.  Gaps between them are extracellular space.
    """
    extent = box_hi - box_lo
    gap = 0.03 * box_size
    probes = rng.uniform(box_lo, box_hi, (4000, 3))  # to estimate the covered fraction
    covered = np.zeros(len(probes), bool)
    cells: list[_Ellipsoid] = []
    for attempt in range(300):
        if len(cells) == 4 or covered.mean() >= 0.75:
            break
        if attempt == 0:
            centre = box_lo + extent * rng.uniform(0.35, 0.65, 3)
            radii = box_size * rng.uniform(0.45, 0.7, 3)
        else:
            centre = rng.uniform(box_lo - 0.2 * extent, box_hi + 0.2 * extent)
            radii = box_size * rng.uniform(0.4, 0.9, 3)
        cell = _Ellipsoid("cell", centre, radii, _random_rotation(rng))
        if any(_ellipsoids_overlap(cell, other, gap) for other in cells):
            continue
        cells.append(cell)
        covered |= np.linalg.norm((probes - cell.centre) @ cell.to_unit.T, axis=1) < 1.0
    return cells


def _place_organelles(
    rng: np.random.Generator,
    cells: list[_Ellipsoid],
    box_lo: np.ndarray,
    box_hi: np.ndarray,
    feature: float,
    voxel: float,
    pm_thickness: float,
) -> list[_Ellipsoid]:
    """Scatter non-overlapping organelles, each wholly inside one cell."""
    gap = voxel  # at least one voxel of cytosol between organelles
    min_radius = 2.0 * voxel
    organelles: list[_Ellipsoid] = []
    ordinals: dict[str, int] = defaultdict(int)

    def add(obj: _Ellipsoid) -> None:
        ordinals[obj.class_name] += 1
        obj.ordinal = ordinals[obj.class_name]
        organelles.append(obj)

    # One nucleus near the middle of each cell, shrunk until it fits.
    nuclei: list[_Ellipsoid] = []
    for cell in cells:
        r_cell = float(cell.radii.min())
        radii = r_cell * rng.uniform(0.3, 0.45) * rng.uniform(0.85, 1.15, 3)
        centre = cell.centre + rng.normal(0.0, 0.1 * r_cell, 3)
        rotation = _random_rotation(rng)
        for _ in range(4):
            nucleus = _Ellipsoid("nuc", centre, radii, rotation)
            if cell.contains(nucleus, pm_thickness + gap):
                add(nucleus)
                nuclei.append(nucleus)
                break
            radii = radii * 0.75

    # Base semi-axes (relative to the feature scale) and target volume fractions.
    # ER sheets go first: they are the hardest to fit.
    shapes = {
        "er": ((0.02, 0.10, 0.14), 0.05),  # flat sheets
        "mito": ((0.05, 0.05, 0.12), 0.08),  # elongated
        "ves": ((0.035, 0.035, 0.035), 0.02),  # small spheres
    }
    jitter = (0.8, 1.25)
    largest = max(max(base) for base, _ in shapes.values()) * feature * jitter[1]
    index = _SpatialHash(2.0 * max(largest, min_radius) + gap)
    usable_volume = 0.5 * float(np.prod(box_hi - box_lo))
    for class_name, (base, volume_fraction) in shapes.items():
        base_radii = np.maximum(np.array(base) * feature, min_radius)
        target = int(np.clip(volume_fraction * usable_volume / (4.0 / 3.0 * math.pi * np.prod(base_radii)), 3, 3000))
        placed = 0
        for _ in range(10 * target + 100):
            if placed == target:
                break
            candidate = _Ellipsoid(
                class_name,
                rng.uniform(box_lo, box_hi),
                np.maximum(base_radii * rng.uniform(*jitter, 3), min_radius),
                _random_rotation(rng),
            )
            if not any(cell.contains(candidate, pm_thickness + gap) for cell in cells):
                continue
            if any(_ellipsoids_overlap(candidate, nucleus, gap) for nucleus in nuclei):
                continue
            if index.collides(candidate, gap):
                continue
            index.add(candidate)
            add(candidate)
            placed += 1
    return organelles


# ----------------------------------------------------------------------------- rendering


def _unit_coordinates(obj: _Ellipsoid, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray) -> list[np.ndarray]:
    """The grid's voxel centres in ``obj``'s unit-ball frame, one array per local axis."""
    a = obj.to_unit.astype(np.float32)
    dz = (zc - obj.centre[0]).astype(np.float32)[:, None, None]
    dy = (yc - obj.centre[1]).astype(np.float32)[None, :, None]
    dx = (xc - obj.centre[2]).astype(np.float32)[None, None, :]
    # The z and y terms only span a plane, so only one full-size add per axis.
    return [(a[k, 0] * dz + a[k, 1] * dy) + a[k, 2] * dx for k in range(3)]


def _squared_norm(unit: list[np.ndarray]) -> np.ndarray:
    q2 = unit[0] * unit[0]
    q2 += unit[1] * unit[1]
    q2 += unit[2] * unit[2]
    return q2


def _surface_band(obj: _Ellipsoid, unit: list[np.ndarray], q2: np.ndarray, max_distance: float):
    """Voxels within ``max_distance`` nm of the surface, and their signed distances.

    Distances are first-order ((q - 1) / |grad q|; exact for spheres), negative inside.
    Since |grad q| <= 1 / r_min, the q-band below contains every such voxel.
    """
    band_width = max_distance / float(obj.radii.min())
    low = max(0.0, 1.0 - band_width) ** 2
    high = (1.0 + band_width) ** 2
    band = (q2 >= low) & (q2 <= high)
    local = np.stack([u[band] for u in unit])
    q = np.sqrt(q2[band])
    gradient = obj.to_unit.T.astype(np.float32) @ local  # = q * grad q
    gradient_norm = np.sqrt((gradient * gradient).sum(axis=0))
    distance = (q - 1.0) * q / np.maximum(gradient_norm, 1e-12)
    return band, distance


def _slices_of(obj: _Ellipsoid, axes: Sequence[np.ndarray]) -> tuple[slice, ...] | None:
    slices = []
    for coords, lo, hi in zip(axes, obj.lo, obj.hi):
        start = int(np.searchsorted(coords, lo, "left"))
        stop = int(np.searchsorted(coords, hi, "right"))
        if start >= stop:
            return None
        slices.append(slice(start, stop))
    return tuple(slices)


def _render(
    world: _World,
    zc: np.ndarray,
    yc: np.ndarray,
    xc: np.ndarray,
    *,
    with_image: bool = False,
    instance_class: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Render the world at the voxel centres ``zc x yc x xc`` (nm, increasing).

    Returns the class-code volume, the noise-free raw grey image (float32, only
    ``with_image``) and the world ordinal of every voxel of ``instance_class``
    (only when asked for).
    """
    axes = (zc, yc, xc)
    shape = (len(zc), len(yc), len(xc))
    lo = np.array([zc[0], yc[0], xc[0]])
    hi = np.array([zc[-1], yc[-1], xc[-1]])
    codes = np.full(shape, _CODE["ecs"], np.uint8)
    image = world.background.sample(zc, yc, xc) + np.float32(_CYTOSOL_GREY) if with_image else None
    ordinals = np.zeros(shape, np.uint32) if instance_class is not None else None

    thickness = world.pm_thickness
    for cell in world.cell_index.overlapping(lo, hi):
        region = _slices_of(cell, axes)
        if region is None:
            continue
        unit = _unit_coordinates(cell, *(a[s] for a, s in zip(axes, region)))
        q2 = _squared_norm(unit)
        cell_codes = codes[region]
        cell_codes[q2 <= 1.0] = _CYTOSOL
        band, distance = _surface_band(cell, unit, q2, thickness + 3.0 * world.membrane_width)
        in_membrane = (distance <= 0.0) & (distance >= -thickness)
        cell_codes[band] = np.where(in_membrane, _CODE["pm"], cell_codes[band])
        if image is not None:
            profile = np.exp(-(((distance + thickness / 2) / (thickness / 2)) ** 2))
            image[region][band] -= (_PM_DARKENING * profile).astype(np.float32)
    if image is not None:
        image[codes == _CODE["ecs"]] += np.float32(_ECS_OFFSET)

    width = world.membrane_width
    for obj in world.organelle_index.overlapping(lo, hi):
        region = _slices_of(obj, axes)
        if region is None:
            continue
        unit = _unit_coordinates(obj, *(a[s] for a, s in zip(axes, region)))
        q2 = _squared_norm(unit)
        inside = q2 <= 1.0
        codes[region][inside] = _CODE[obj.class_name]
        if ordinals is not None and obj.class_name == instance_class:
            ordinals[region][inside] = obj.ordinal
        if image is None:
            continue
        interior = image[region][inside] + np.float32(_INTERIOR_OFFSET[obj.class_name])
        if obj.class_name == "mito":
            # Cristae: dark stripes across the long axis.
            long_axis = int(np.argmax(obj.radii))
            along = unit[long_axis][inside] * np.float32(obj.radii[long_axis])
            period = max(4.0 * width, 0.3 * float(obj.radii[long_axis]))
            interior -= _CRISTAE_DARKENING * (np.cos(along * np.float32(2.0 * math.pi / period)) > 0.6)
        image[region][inside] = interior
        band, distance = _surface_band(obj, unit, q2, 4.0 * width)
        profile = np.exp(-(((distance + width) / width) ** 2))
        image[region][band] -= (_MEMBRANE_DARKENING[obj.class_name] * profile).astype(np.float32)
    return codes, image, ordinals


def _voxel_centres(translation: np.ndarray, voxel_size: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    return [t + v * np.arange(n, dtype=np.float64) for t, v, n in zip(translation, voxel_size, shape)]


def _render_volume(
    world: _World,
    translation: np.ndarray,
    voxel_size: np.ndarray,
    shape: Sequence[int],
    instance_class: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class codes (and instance ordinals) of a whole grid, rendered in z slabs."""
    zc, yc, xc = _voxel_centres(translation, voxel_size, shape)
    codes = np.empty(tuple(shape), np.uint8)
    ordinals = np.empty(tuple(shape), np.uint32) if instance_class is not None else None
    step = max(1, _VOXELS_PER_PASS // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        slab_codes, _, slab_ordinals = _render(world, zc[z0:z1], yc, xc, instance_class=instance_class)
        codes[z0:z1] = slab_codes
        if ordinals is not None and slab_ordinals is not None:
            ordinals[z0:z1] = slab_ordinals
    return codes, ordinals


def _downsample_mean(block: np.ndarray) -> np.ndarray:
    """2x block mean of a uint8 volume, rounded half up; odd trailing planes are dropped."""
    nz, ny, nx = (n // 2 for n in block.shape)
    trimmed = block[: 2 * nz, : 2 * ny, : 2 * nx].astype(np.uint16)
    sums = trimmed.reshape(nz, 2, ny, 2, nx, 2).sum(axis=(1, 3, 5), dtype=np.uint16)
    return ((sums + 4) // 8).astype(np.uint8)


# ----------------------------------------------------------------------------- zarr output


def _rounded(values) -> list[float]:
    # Keeps JSON free of binary noise such as 36.680000000000007.
    return [round(float(v), 6) for v in values]


def _zyx(values) -> tuple[float, float, float]:
    z, y, x = _rounded(values)
    return z, y, x


#: How to get the optional dependencies of this module (zarr-python and numcodecs).
_SYNTHETIC_EXTRA_HINT = "pip install 'cellmap-data[synthetic]'"


def _import_zarr() -> tuple[Any, Any]:
    """``(zarr, numcodecs)``, imported on first use.

    Only writing synthetic data needs zarr-python (>= 3, for its v2 and v3 writers) and
    numcodecs: they are the optional ``synthetic`` extra, so that the package itself
    installs beside either zarr 2 or zarr 3.  Raises ImportError naming the extra when
    they are missing or zarr is older than 3.
    """
    try:
        import numcodecs
        import zarr
    except ImportError as error:
        raise ImportError(
            f"writing synthetic data needs zarr-python >= 3 and numcodecs, which are not installed "
            f"({error}); install the 'synthetic' extra: {_SYNTHETIC_EXTRA_HINT}"
        ) from error
    found = str(getattr(zarr, "__version__", "0"))
    major = found.split(".", 1)[0]
    if not major.isdigit() or int(major) < 3:
        raise ImportError(
            f"writing synthetic data needs zarr-python >= 3, found zarr {found}; install the "
            f"'synthetic' extra ({_SYNTHETIC_EXTRA_HINT}) in an environment that does not pin zarr<3 "
            f"(reading data with cellmap_data does not need zarr-python at all)"
        )
    return zarr, numcodecs


def _level_transform(voxel_size: np.ndarray, translation: np.ndarray, level: int) -> tuple[list[float], list[float]]:
    """Scale and translation of pyramid level ``level``; the translation is the centre of voxel 0."""
    factor = 2**level
    return _rounded(voxel_size * factor), _rounded(translation + (factor - 1) * voxel_size / 2)


class _ZarrWriter:
    """Creates groups and arrays of one container in the requested flavour of Zarr."""

    def __init__(
        self, zarr_format: Literal[2, 3], compressor: str, sharded: bool, chunk: int, dimension_separator: str,
        chunks_per_shard: int = 2,
    ):
        zarr, numcodecs = _import_zarr()
        from zarr.codecs import BloscCodec, ZstdCodec

        self.zarr = zarr
        self.zarr_format = zarr_format
        self.chunks = (chunk,) * 3
        self.shards = (chunks_per_shard * chunk,) * 3 if sharded else None
        self.dimension_separator = dimension_separator
        if zarr_format == 2:
            self.compressor = (
                numcodecs.Zstd(level=6, checksum=False)
                if compressor == "zstd"
                else numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
            )
        else:
            self.compressor = (
                ZstdCodec(level=6, checksum=False)
                if compressor == "zstd"
                else BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
            )

    @property
    def write_block(self) -> int:
        """z thickness of the slabs the raw volume is written in (whole chunks or shards)."""
        return (self.shards or self.chunks)[0]

    def open_root(self, path: Path):
        if path.exists():
            shutil.rmtree(path)
        return self.zarr.open_group(store=str(path), mode="w", zarr_format=self.zarr_format)

    def require_groups(self, root, path: str):
        group = root
        for name in path.split("/"):
            group = group.require_group(name)
        return group

    def multiscale_attributes(self, name: str, voxel_size: np.ndarray, translation: np.ndarray, levels: int) -> dict:
        datasets = []
        for level in range(levels):
            scale, offset = _level_transform(voxel_size, translation, level)
            datasets.append(
                {
                    "path": f"s{level}",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": offset},
                    ],
                }
            )
        multiscale = {
            "name": name,
            "axes": [{"name": axis, "type": "space", "unit": "nanometer"} for axis in "zyx"],
            "datasets": datasets,
        }
        if self.zarr_format == 2:
            return {"multiscales": [{"version": "0.4", **multiscale}]}
        return {"ome": {"version": "0.5", "multiscales": [multiscale]}}

    def create_array(self, group, name: str, shape: Sequence[int], dtype, attributes: dict | None = None):
        options: dict[str, Any] = {}
        if self.zarr_format == 2:
            options["chunk_key_encoding"] = {"name": "v2", "separator": self.dimension_separator}
        else:
            options["dimension_names"] = ["z", "y", "x"]
            if self.shards is not None:
                options["shards"] = self.shards
        array = group.create_array(
            name,
            shape=tuple(shape),
            chunks=self.chunks,
            dtype=dtype,
            compressors=self.compressor,
            fill_value=0,
            attributes=attributes or {},
            **options,
        )
        if self.zarr_format == 2:
            self._pin_zstd_checksum(Path(str(group.store.root)) / array.path / ".zarray")
        return array

    @staticmethod
    def _pin_zstd_checksum(zarray_path: Path) -> None:
        # zarr-python drops `"checksum": false` from v2 zstd configs; CellMap's
        # containers spell it out, so put it back.
        meta = json.loads(zarray_path.read_text())
        compressor = meta.get("compressor") or {}
        if compressor.get("id") == "zstd" and "checksum" not in compressor:
            compressor["checksum"] = False
            zarray_path.write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- planning


@dataclass
class _CropPlan:
    number: int
    dataset_index: int
    voxel_size: np.ndarray
    shape: tuple[int, int, int]
    translation: np.ndarray
    usage: str
    classes: set[str] = field(default_factory=set)
    instance_classes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"crop{self.number}"

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        lo = self.translation - self.voxel_size / 2
        return lo, lo + self.voxel_size * np.array(self.shape)


@dataclass
class _DatasetPlan:
    index: int
    name: str
    pattern: _DatasetPattern
    raw_shape: tuple[int, int, int]
    raw_voxel_size: np.ndarray
    raw_translation: np.ndarray
    world: _World
    crops: list[_CropPlan]


def _even(value: float, minimum: int = 4) -> int:
    return max(minimum, int(value) // 2 * 2)


def _resolve_size(size) -> tuple[int | tuple[int, int, int], int]:
    """Returns (raw edge length or explicit raw shape, chunk edge)."""
    if isinstance(size, str):
        if size not in SIZE_PRESETS:
            raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZE_PRESETS)} or a (z, y, x) shape")
        return SIZE_PRESETS[size]
    try:
        shape = tuple(int(n) for n in size)
    except TypeError:
        raise ValueError(f"size must be a preset name or a (z, y, x) shape, got {size!r}") from None
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"a raw shape needs three sizes of at least 16 voxels, got {size!r}")
    return shape, 64 if max(shape) >= 256 else 32


def _raw_shape_for(pattern: _DatasetPattern, size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(size, tuple):
        return size
    # Multiples of 4 so the three pyramid levels tile exactly.
    return (max(16, int(size * pattern.z_shape_factor) // 4 * 4), size, size)


def _place_crop(
    rng: np.random.Generator,
    raw_lo: np.ndarray,
    raw_hi: np.ndarray,
    raw_voxel: np.ndarray,
    extent: np.ndarray,
    aligned: bool,
    must_contain: np.ndarray | None,
) -> np.ndarray:
    """Lower corner of a crop box inside the raw box.

    An aligned crop starts on a raw voxel boundary; the others are shifted by a
    random multiple of 0.5 nm below one raw voxel, as real crops often are.
    """
    span = raw_hi - extent - raw_lo
    max_steps = np.floor(span / raw_voxel + 1e-9).astype(np.int64)
    if must_contain is not None:
        wanted = must_contain - extent * rng.uniform(0.3, 0.7, 3) - raw_lo
        steps = np.clip(np.floor(wanted / raw_voxel).astype(np.int64), 0, max_steps)
    else:
        steps = np.array([rng.integers(0, m + 1) for m in max_steps])
    lo = raw_lo + steps * raw_voxel
    if not aligned:
        for axis in range(3):
            half_nm_steps = int(2 * raw_voxel[axis] - 1e-9)
            if steps[axis] < max_steps[axis] and half_nm_steps >= 1:
                lo[axis] += 0.5 * rng.integers(1, half_nm_steps + 1)
    return lo


def _plan_dataset(index: int, seed: int, size, pattern: _DatasetPattern | None = None) -> _DatasetPlan:
    pattern = pattern or _PATTERNS[index % len(_PATTERNS)]
    rng = _rng(seed, _WORLD_STREAM, index)
    raw_shape = _raw_shape_for(pattern, size)
    raw_voxel = np.array(pattern.raw_voxel_size)
    raw_translation = (
        np.array(_rounded(raw_voxel * rng.integers(0, 16, 3))) if pattern.random_origin else np.zeros(3)
    )
    raw_lo = raw_translation - raw_voxel / 2
    raw_hi = raw_lo + raw_voxel * np.array(raw_shape)
    world = _build_world(rng, raw_lo, raw_hi, raw_voxel)
    return _DatasetPlan(index, f"ds{index}", pattern, raw_shape, raw_voxel, raw_translation, world, [])


def _plan_crops(plans: list[_DatasetPlan], seed: int) -> None:
    """Place every crop and decide which classes it annotates."""
    number = 0
    for plan in plans:
        rng = _rng(seed, _CROP_STREAM, plan.index)
        raw_lo, raw_hi = plan.world.box_lo, plan.world.box_hi
        raw_extent = raw_hi - raw_lo
        for crop_index, spec in enumerate(plan.pattern.crops):
            number += 1
            voxel = np.array(spec.voxel_size)
            fz, fy, fx = (f * e / v for f, e, v in zip(spec.extent_fraction, raw_extent, voxel))
            shape = (_even(fz), _even(fy), _even(fx))
            extent = voxel * np.array(shape)
            must_contain = None
            if plan.index == 0 and crop_index == 0:
                # The instance crop is centred near a mitochondrion so it has instances.
                mitos = [o for o in plan.world.organelles if o.class_name == "mito"]
                inside = [m for m in mitos if np.all(m.centre >= raw_lo) and np.all(m.centre <= raw_hi)]
                if inside:
                    must_contain = inside[int(rng.integers(len(inside)))].centre
            lo = _place_crop(rng, raw_lo, raw_hi, plan.raw_voxel_size, extent, crop_index == 0, must_contain)
            usage = "validate" if crop_index == _VALIDATE_CROP_INDEX else "train"
            translation = np.array(_rounded(lo + voxel / 2))
            plan.crops.append(_CropPlan(number, plan.index, voxel, shape, translation, usage))

    rng = _rng(seed, _ANNOTATION_STREAM)
    all_crops = [crop for plan in plans for crop in plan.crops]
    for crop in all_crops:
        count = int(rng.integers(2, len(CLASS_NAMES) + 1))
        crop.classes = set(rng.choice(CLASS_NAMES, size=count, replace=False).tolist())
    for class_name in CLASS_NAMES:
        if not any(class_name in crop.classes for crop in all_crops):
            all_crops[int(rng.integers(len(all_crops)))].classes.add(class_name)

    first = plans[0]
    first.crops[0].classes.add("mito")
    first.crops[0].instance_classes = ["mito"]

    # Guarantee an annotated-but-absent class: in the last crop of the first dataset,
    # clear the organelle class whose removal costs the least volume (often none;
    # never "mito": the instance crop relies on it) and annotate it there.
    target = first.crops[-1]
    lo, hi = target.box
    candidates = ("ves", "er", "nuc")
    touching = {
        name: [o for o in first.world.organelles if o.class_name == name and o.intersects_box(lo, hi)]
        for name in candidates
    }
    absent = min(
        candidates,
        key=lambda name: (sum(float(np.prod(o.radii)) for o in touching[name]), candidates.index(name)),
    )
    first.world.remove_organelles(touching[absent])
    target.classes.add(absent)


# ----------------------------------------------------------------------------- writing


def _write_raw(plan: _DatasetPlan, writer: _ZarrWriter, root, noise_rng: np.random.Generator) -> None:
    group = writer.require_groups(root, RAW_GROUP)
    group.attrs.update(
        writer.multiscale_attributes("fibsem-uint8", plan.raw_voxel_size, plan.raw_translation, RAW_LEVELS)
    )
    shapes = [tuple(n // 2**level for n in plan.raw_shape) for level in range(RAW_LEVELS)]
    levels = [writer.create_array(group, f"s{level}", shape, "uint8") for level, shape in enumerate(shapes)]

    zc, yc, xc = _voxel_centres(plan.raw_translation, plan.raw_voxel_size, plan.raw_shape)
    half = np.zeros(shapes[1], np.uint8)
    block_z = writer.write_block  # even, so every block starts on a pair of planes
    step = max(2, _VOXELS_PER_PASS // (len(yc) * len(xc)) // 2 * 2)
    for z0 in range(0, len(zc), block_z):
        z1 = min(len(zc), z0 + block_z)
        block = np.empty((z1 - z0, len(yc), len(xc)), np.uint8)
        for start in range(z0, z1, step):
            stop = min(z1, start + step)
            _, image, _ = _render(plan.world, zc[start:stop], yc, xc, with_image=True)
            assert image is not None
            image += noise_rng.standard_normal(image.shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)
            np.clip(image, 0, 255, out=image)
            block[start - z0 : stop - z0] = np.rint(image).astype(np.uint8)
        levels[0][z0:z1] = block
        downsampled = _downsample_mean(block)
        half[z0 // 2 : z0 // 2 + downsampled.shape[0]] = downsampled
    levels[1][...] = half
    levels[2][...] = _downsample_mean(half)


def _label_attributes(class_name: str, instance: bool) -> dict:
    if instance:
        annotation_type = {"type": "instance_segmentation", "encoding": {"absent": 0}}
    else:
        annotation_type = {"type": "semantic_segmentation", "encoding": {"absent": 0, "present": 1}}
    return {"cellmap": {"annotation": {"class_name": class_name, "annotation_type": annotation_type}}}


def _write_crop(
    plan: _DatasetPlan, crop: _CropPlan, writer: _ZarrWriter, root, write_counts: bool
) -> list[str]:
    """Writes one crop; returns the annotated classes that have no foreground at s0."""
    classes = [name for name in CLASS_NAMES if name in crop.classes]
    group = writer.require_groups(root, f"{GROUNDTRUTH_GROUP}/{crop.name}")
    group.attrs.update({"cellmap": {"annotation": {"class_names": classes}}})

    instance_class = crop.instance_classes[0] if crop.instance_classes else None
    rendered = []  # per level: (codes, ordinals)
    for level in range(LABEL_LEVELS):
        factor = 2**level
        scale = crop.voxel_size * factor
        translation = crop.translation + (factor - 1) * crop.voxel_size / 2
        shape = tuple(n // factor for n in crop.shape)
        rendered.append(_render_volume(plan.world, translation, scale, shape, instance_class))

    instance_ids = np.zeros(1, np.uint8)
    if instance_class is not None:
        # Number the instances present in this crop 1..k, consistently across levels.
        present = np.union1d(*(np.unique(ordinals) for _, ordinals in rendered if ordinals is not None))
        present = present[present > 0]
        instance_ids = np.zeros(int(present.max(initial=0)) + 1, np.uint16)
        instance_ids[present] = np.arange(1, len(present) + 1)
        if len(present) <= 255:
            instance_ids = instance_ids.astype(np.uint8)

    empty = []
    for class_name in classes:
        is_instance = class_name == instance_class
        class_group = group.require_group(class_name)
        class_group.attrs.update(
            {
                **writer.multiscale_attributes(class_name, crop.voxel_size, crop.translation, LABEL_LEVELS),
                **_label_attributes(class_name, is_instance),
            }
        )
        for level, (codes, ordinals) in enumerate(rendered):
            if is_instance and ordinals is not None:
                labels = instance_ids[np.where(codes == _CODE[class_name], ordinals, 0)]
            else:
                labels = (codes == _CODE[class_name]).view(np.uint8)
            background = int(labels.size - np.count_nonzero(labels))
            if level == 0 and background == labels.size:
                empty.append(class_name)
            attributes = (
                {"cellmap": {"annotation": {"complement_counts": {"absent": background, "unknown": 0}}}}
                if write_counts
                else None
            )
            array = writer.create_array(class_group, f"s{level}", labels.shape, labels.dtype, attributes)
            array[...] = labels
    return empty


def _write_datasplit(path: Path, datasets: list[SyntheticDataset]) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for dataset in datasets:
            for crop in dataset.crops:
                out.writerow(
                    [
                        crop.usage,
                        str(dataset.zarr_path),
                        RAW_GROUP,
                        str(dataset.zarr_path),
                        f"{GROUNDTRUTH_GROUP}/{crop.name}/[{','.join(crop.classes)}]",
                    ]
                )


def _write_datasets(plans: list[_DatasetPlan], root: Path, writer: _ZarrWriter, seed: int,
                    write_counts: bool) -> list[SyntheticDataset]:
    """Writes every planned dataset (raw and crops) under ``root``."""
    datasets = []
    for plan in plans:
        zarr_path = root / f"{plan.name}.zarr"
        group = writer.open_root(zarr_path)
        _write_raw(plan, writer, group, _rng(seed, _NOISE_STREAM, plan.index))
        crops = []
        for crop in plan.crops:
            empty = _write_crop(plan, crop, writer, group, write_counts)
            classes = [name for name in CLASS_NAMES if name in crop.classes]
            crop_path = zarr_path / GROUNDTRUTH_GROUP / crop.name
            crops.append(
                SyntheticCrop(
                    name=crop.name,
                    path=crop_path,
                    classes=classes,
                    voxel_size=_zyx(crop.voxel_size),
                    shape=crop.shape,
                    translation=_zyx(crop.translation),
                    target_path=f"{crop_path}/[{','.join(classes)}]",
                    usage=crop.usage,
                    instance_classes=list(crop.instance_classes),
                    empty_classes=empty,
                )
            )
        datasets.append(
            SyntheticDataset(
                name=plan.name,
                zarr_path=zarr_path,
                raw_path=zarr_path / RAW_GROUP,
                raw_voxel_size=_zyx(plan.raw_voxel_size),
                raw_shape=plan.raw_shape,
                raw_translation=_zyx(plan.raw_translation),
                crops=crops,
            )
        )

    return datasets


def make_synthetic_data(
    out_dir,
    *,
    size="tiny",
    n_datasets: int = 2,
    seed: int = 0,
    zarr_format: int = 2,
    sharded: bool = False,
    chunks_per_shard: int = 2,
    compressor: str = "zstd",
    write_counts: bool = True,
    dimension_separator: str = ".",
) -> SyntheticData:
    """Write synthetic CellMap-style datasets and a datasplit CSV under ``out_dir``.

    Args:
        out_dir: Output folder (created if needed).  Existing ``ds<i>.zarr``
            containers and ``datasplit.csv`` in it are replaced; nothing else is touched.
        size: ``"tiny"`` (80^3 raw, 32^3 chunks, ~2 s), ``"small"`` (128^3),
            ``"bench"`` (640^3 raw, 64^3 chunks, ~0.47 G raw voxels over two
            datasets, ~1 min, ~400 MB on disk) or an explicit ``(z, y, x)`` raw s0
            shape (each at least 16).  The anisotropic datasets get 80 % of the z
            slices of a named size.
        n_datasets: Number of containers; they cycle through an isotropic 4 nm pattern
            (crops at 4 nm and 8 nm) and an anisotropic (5.24, 4, 4) nm one.
        seed: Everything is a deterministic function of it.
        zarr_format: 2 (OME-NGFF 0.4 ``multiscales``) or 3 (OME-NGFF 0.5 ``ome``).
        sharded: Zarr v3 only; shards of ``chunks_per_shard`` chunks along each axis.
        chunks_per_shard: Chunks per shard along each axis when ``sharded`` (default 2).
        compressor: ``"zstd"`` (level 6, as CellMap) or ``"blosc"`` (zstd, level 5, shuffle).
        write_counts: Store ``complement_counts`` on every label array, as real data does.
        dimension_separator: Chunk-key separator of Zarr v2 arrays, ``"."`` or ``"/"``
            (v3 arrays always use the standard ``c/0/0/0`` keys).

    Returns:
        A :class:`SyntheticData` describing the containers, crops and CSV.
    """
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
    if sharded and zarr_format != 3:
        raise ValueError("sharding needs zarr_format=3")
    if not isinstance(chunks_per_shard, int) or isinstance(chunks_per_shard, bool) or chunks_per_shard < 1:
        raise ValueError(f"chunks_per_shard must be a positive integer, got {chunks_per_shard!r}")
    if compressor not in ("zstd", "blosc"):
        raise ValueError(f"compressor must be 'zstd' or 'blosc', got {compressor!r}")
    if dimension_separator not in (".", "/"):
        raise ValueError(f"dimension_separator must be '.' or '/', got {dimension_separator!r}")
    if not isinstance(n_datasets, int) or n_datasets < 1:
        raise ValueError(f"n_datasets must be a positive integer, got {n_datasets!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    raw_size, chunk = _resolve_size(size)
    _import_zarr()  # fail before planning or touching out_dir when the extra is missing

    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    plans = [_plan_dataset(index, seed, raw_size) for index in range(n_datasets)]
    _plan_crops(plans, seed)

    writer = _ZarrWriter(2 if zarr_format == 2 else 3, compressor, sharded, chunk, dimension_separator, chunks_per_shard)
    datasets = _write_datasets(plans, root, writer, seed, write_counts)
    csv_path = root / "datasplit.csv"
    _write_datasplit(csv_path, datasets)
    return SyntheticData(root=root, csv_path=csv_path, datasets=datasets, classes=list(CLASS_NAMES))


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of the folder ``source`` whose files are hard links (copies where the
    file system cannot link). An existing complete ``target`` is kept."""
    done = target / ".linked"
    if done.exists():
        return
    for folder, _, files in os.walk(source):
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            dst = out / name
            if dst.exists():
                continue
            try:
                os.link(Path(folder) / name, dst)
            except OSError:
                shutil.copy2(Path(folder) / name, dst)
    done.touch()


def _relocated(dataset: SyntheticDataset, zarr_path: Path, name: str) -> SyntheticDataset:
    """``dataset`` as it reads from a copy of its container at ``zarr_path``."""
    crops = []
    for crop in dataset.crops:
        path = zarr_path / crop.path.relative_to(dataset.zarr_path)
        crops.append(SyntheticCrop(**{**crop.__dict__, "path": path,
                                      "target_path": f"{path}/[{','.join(crop.classes)}]"}))
    return SyntheticDataset(**{**dataset.__dict__, "name": name, "zarr_path": zarr_path,
                               "raw_path": zarr_path / RAW_GROUP, "crops": crops})


def make_many_crops_data(out_dir, crops: int, *, base_volumes: int = 2, raw_size: int = 512, seed: int = 0,
                         compressor: str = "blosc") -> SyntheticData:
    """A training split of ``crops`` label crops over ``ceil(crops / 4)`` volumes, as large CellMap
    splits are (hundreds of crops over dozens of volumes).

    ``base_volumes`` volumes are rendered once under ``out_dir/base`` (8 nm raw of ``raw_size``³
    voxels in 64³ chunks, blosc-zstd by default; four training crops of about 150³ voxels at 8 nm
    and one validation crop each); every other volume is a copy of one of them whose files are
    hard links, so hundreds of crops cost the disk space of the base volumes while a loader sees
    distinct volumes (distinct paths, distinct cache entries). The CSV lists ``crops`` training
    crops (four per volume) and the base volumes' validation crops. Calling it again with the
    same base reuses what is on disk.
    """
    if not isinstance(crops, int) or crops < 1:
        raise ValueError(f"crops must be a positive integer, got {crops!r}")
    if compressor not in ("zstd", "blosc"):
        raise ValueError(f"compressor must be 'zstd' or 'blosc', got {compressor!r}")
    _import_zarr()
    root = Path(out_dir).resolve()
    base_root = root / "base"
    marker = base_root / f"base-{base_volumes}-{raw_size}-{seed}-{compressor}.json"
    plans = [_plan_dataset(index, seed, (raw_size,) * 3, _MANY_CROPS_PATTERN) for index in range(base_volumes)]
    _plan_crops(plans, seed)
    import pickle

    bases = None
    if marker.exists():
        try:
            bases = pickle.loads(marker.with_suffix(".pickle").read_bytes())
        except (OSError, pickle.UnpicklingError, ImportError, AttributeError, EOFError):
            bases = None  # written by another version of this module (or cut short): built again
    if bases is None:
        if base_root.exists():
            shutil.rmtree(base_root)
        base_root.mkdir(parents=True)
        writer = _ZarrWriter(2, compressor, False, 64, ".")
        bases = _write_datasets(plans, base_root, writer, seed, True)
        marker.with_suffix(".pickle").write_bytes(pickle.dumps(bases))
        marker.write_text(json.dumps({"volumes": base_volumes, "raw_size": raw_size, "seed": seed}))
    volumes = []
    for k in range(math.ceil(crops / _MANY_CROPS_PER_VOLUME)):
        base = bases[k % base_volumes]
        zarr_path = root / f"vol{k:03d}.zarr"
        _link_tree(base.zarr_path, zarr_path)
        volumes.append(_relocated(base, zarr_path, f"vol{k:03d}"))
    csv_path = root / f"datasplit-{crops}.csv"
    with csv_path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        listed = 0
        for volume in volumes:
            for crop in volume.crops:
                if crop.usage == "train" and listed < crops:
                    out.writerow(["train", str(volume.zarr_path), RAW_GROUP, str(volume.zarr_path),
                                  f"{GROUNDTRUTH_GROUP}/{crop.name}/[{','.join(crop.classes)}]"])
                    listed += 1
        for volume in volumes[:base_volumes]:
            for crop in volume.crops:
                if crop.usage == "validate":
                    out.writerow(["validate", str(volume.zarr_path), RAW_GROUP, str(volume.zarr_path),
                                  f"{GROUNDTRUTH_GROUP}/{crop.name}/[{','.join(crop.classes)}]"])
    return SyntheticData(root=root, csv_path=csv_path, datasets=volumes, classes=list(CLASS_NAMES))
