"""Rich display of datasets, splits, loaders and images: the ``_repr_html_`` shown by Jupyter and
VS Code, and the text of ``repr()``.

Everything here is built from what the objects already know: their configuration, the engine's
sizes and chosen levels, and multiscale metadata. Nothing reads voxels or counts classes (class
counts can need a scan of every label volume, so they are left to ``stats()``). Every string
that comes from the user or the data (paths, class and array names, transform reprs) is
escaped; the HTML is one self-contained ``<div>`` with a scoped ``<style>``, no scripts.

Class markings, in both forms:

- ``✓`` *annotated*: the crop has a label volume for the class;
- ``¬`` *inferred negative*: not annotated, but mutually exclusive (``class_relation_dict``)
  with an annotated class, so its voxels are true negatives where that class is labelled and
  unknown elsewhere;
- ``·`` *absent*: not annotated and nothing implies it; its targets are unknown (NaN, or
  ``empty_value``) everywhere.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .formatting import html_table, number_text, triple_text

__all__ = [
    "ANNOTATED",
    "ABSENT",
    "INFERRED",
    "class_status",
    "dataset_html",
    "dataset_text",
    "datasplit_html",
    "datasplit_text",
    "image_html",
    "image_text",
    "loader_html",
    "loader_text",
    "multidataset_html",
    "multidataset_text",
    "subset_html",
    "subset_text",
]

#: Status of a class in a crop: annotated, inferred true negative, absent.
ANNOTATED, INFERRED, ABSENT = "annotated", "inferred negative", "absent"
_SYMBOL = {ANNOTATED: "✓", INFERRED: "¬", ABSENT: "·"}
_CSS_CLASS = {ANNOTATED: "cm-ok", INFERRED: "cm-inf", ABSENT: "cm-no"}

#: Crops listed in a coverage table (and in a text repr) before the rest are summarised.
MAX_ROWS = 40
MAX_TEXT_ITEMS = 6

_STYLE = """<style>
.cellmap-repr{font-family:var(--jp-ui-font-family,system-ui,-apple-system,'Segoe UI',sans-serif);font-size:12px;line-height:1.45;max-width:100%;overflow-x:auto}
.cellmap-repr .cm-head{font-size:13px;margin:2px 0 4px 0}
.cellmap-repr .cm-dim{opacity:.65}
.cellmap-repr table{border-collapse:collapse;margin:2px 0 6px 0;font-size:12px}
.cellmap-repr th,.cellmap-repr td{padding:1px 7px;text-align:left;vertical-align:top;border-bottom:1px solid rgba(127,127,127,.25);white-space:nowrap}
.cellmap-repr th{font-weight:600}
.cellmap-repr td.cm-wrap{white-space:normal;word-break:break-all}
.cellmap-repr table.cm-matrix td.cm-c,.cellmap-repr table.cm-matrix th.cm-c{text-align:center;padding:1px 4px}
.cellmap-repr code{font-size:11px;background:none;padding:0}
.cellmap-repr details{margin:1px 0 2px 0}
.cellmap-repr details>summary{cursor:pointer;font-weight:600}
.cellmap-repr details details{margin-left:14px}
.cellmap-repr .cm-ok{color:#1a7f37;font-weight:600}
.cellmap-repr .cm-inf{color:#b35900;font-weight:600}
.cellmap-repr .cm-no{opacity:.45}
.cellmap-repr .cm-read{font-weight:600}
</style>"""


# -- small helpers ------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """``value`` as escaped HTML text (quotes included, for attributes)."""
    return html.escape(str(value), quote=True)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _callable_name(obj: Any) -> str:
    if obj is None:
        return "none"
    return _short(repr(obj), 200)


def _frame() -> str:
    try:
        from .._config import get_coordinate_frame

        return get_coordinate_frame()
    except Exception:  # pragma: no cover - the engine always answers
        return "?"


def _safe(text_of: Callable[[Any], str]) -> Callable[[Callable[[Any], str]], Callable[[Any], str]]:
    """Makes a display builder never raise: on an error it falls back to ``text_of`` (and, if
    that fails too, to the class name), with the error noted."""

    def decorate(build: Callable[[Any], str]) -> Callable[[Any], str]:
        @functools.wraps(build)
        def wrapper(obj: Any) -> str:
            try:
                return build(obj)
            except Exception as error:  # a repr must not raise
                try:
                    fallback = text_of(obj)
                except Exception:
                    fallback = type(obj).__name__
                note = f"(display failed: {type(error).__name__}: {error})"
                if build.__name__.endswith("_html"):
                    return f'<div class="cellmap-repr"><pre>{_e(fallback)}\n{_e(note)}</pre></div>'
                return f"{fallback} {note}"

        return wrapper

    return decorate


def _minimal_text(obj: Any) -> str:
    return f"<{type(obj).__name__}>"


def _wrap(body: str) -> str:
    return f'{_STYLE}<div class="cellmap-repr">{body}</div>'


def _kv_table(items: Sequence[tuple[str, str]]) -> str:
    """A two-column key/value table (keys escaped here, values already escaped)."""
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="cm-wrap">{v}</td></tr>' for k, v in items)
    return f"<table><tbody>{rows}</tbody></table>"


def _details(summary: str, content: str, open_: bool = True) -> str:
    """A collapsible section (``summary`` already escaped)."""
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>{content}</details>"


def _code(text: Any) -> str:
    return f"<code>{_e(text)}</code>"


def _box(box: Mapping[str, tuple[float, float]] | None) -> str:
    if box is None:
        return "none (no patch fits)"
    return ", ".join(f"{_e(a)}: [{number_text(lo)}, {number_text(hi)}]" for a, (lo, hi) in box.items()) + " nm"


# -- classes ------------------------------------------------------------------------------------
def class_status(dataset: Any, cls: str) -> tuple[str, list[str]]:
    """``(status, related)`` of class ``cls`` in ``dataset``'s crop: :data:`ANNOTATED`,
    :data:`INFERRED` (with the annotated, mutually exclusive classes that make it a true
    negative) or :data:`ABSENT`. Uses the crop's class list only (no data is read)."""
    annotated = list(getattr(dataset, "annotated_classes", []) or [])
    if cls in annotated:
        return ANNOTATED, []
    exclusive = dataset.exclusive_classes(cls) if hasattr(dataset, "exclusive_classes") else []
    related = [r for r in exclusive if r in annotated]
    return (INFERRED, related) if related else (ABSENT, [])


def _statuses(dataset: Any, classes: Sequence[str]) -> list[tuple[str, list[str]]]:
    return [class_status(dataset, c) for c in classes]


def _mark(status: str, title: str = "") -> str:
    tip = f' title="{_e(title or status)}"'
    return f'<span class="{_CSS_CLASS[status]}"{tip}>{_SYMBOL[status]}</span>'


_LEGEND = (
    f'<div class="cm-dim">{_mark(ANNOTATED)} annotated &nbsp; {_mark(INFERRED)} inferred true negative '
    f"(mutually exclusive with an annotated class) &nbsp; {_mark(ABSENT)} absent (unknown)</div>"
)


def _crop_path(dataset: Any) -> str:
    """The crop folder of a dataset (the target template before ``{label}``)."""
    template = getattr(dataset, "target_template", "") or ""
    if "{label}" in template:
        return template.split("{label}", 1)[0].rstrip("/\\") or template
    return str(getattr(dataset, "target_path", "") or getattr(dataset, "raw_path", ""))


def _container(path: str) -> str:
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    for p in reversed(parts):
        if p.endswith((".zarr", ".n5")):
            return p
    return ""


def _crop_name(dataset: Any) -> str:
    """A short name of a dataset's crop: ``container · crop`` (e.g. ``jrc_hela-2.zarr · crop155``)."""
    crop = _crop_path(dataset)
    base = os.path.basename(crop.rstrip("/\\")) or crop
    container = _container(crop) or _container(str(getattr(dataset, "raw_path", "")))
    return f"{container} · {base}" if container and container != base else base


def _class_summary_text(dataset: Any) -> str:
    annotated, inferred, absent = [], [], []
    for c, (status, related) in zip(dataset.classes, _statuses(dataset, dataset.classes)):
        if status == ANNOTATED:
            annotated.append(c)
        elif status == INFERRED:
            inferred.append(f"{c} (from {', '.join(related)})")
        else:
            absent.append(c)
    return (
        f"annotated: {', '.join(annotated) or 'none'} | inferred negatives: {', '.join(inferred) or 'none'} | "
        f"absent: {', '.join(absent) or 'none'}"
    )


# -- arrays -------------------------------------------------------------------------------------
def _spec_lists(spec: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    shape = spec.get("shape", ())
    scale = spec.get("scale", ())
    shape = list(shape) if isinstance(shape, (list, tuple)) else [shape]
    scale = list(scale) if isinstance(scale, (list, tuple)) else [scale]
    return shape, scale


def _extent(shape: Sequence[Any], scale: Sequence[Any]) -> str:
    if len(shape) != len(scale):
        return "—"
    try:
        return triple_text([float(n) * float(v) for n, v in zip(shape, scale)])
    except (TypeError, ValueError):
        return "—"


def _arrays_text(input_arrays: Mapping[str, Any], target_arrays: Mapping[str, Any],
                 levels: Mapping[str, str] | None = None) -> str:
    groups = []
    for role, arrays in (("inputs", input_arrays), ("targets", target_arrays)):
        parts = []
        for name, spec in (arrays or {}).items():
            shape, scale = _spec_lists(spec)
            level = f" ({levels[name]})" if levels and name in levels else ""
            parts.append(f"{name} {triple_text(shape, 'x')} @ {triple_text(scale, 'x')} nm{level}")
        if parts:
            groups.append(f"{role}: {', '.join(parts)}")
    return " | ".join(groups) or "arrays: none"


def _arrays_html(input_arrays: Mapping[str, Any], target_arrays: Mapping[str, Any], axis_order: str | None = None,
                 tensors: Mapping[str, Sequence[int]] | None = None, levels: Mapping[str, str] | None = None) -> str:
    headers = ["array", "role", "shape (voxels)", "voxel size (nm)", "extent (nm)"]
    if tensors:
        headers.append("sample tensor")
    if levels:
        headers.append("level read")
    rows = []
    for role, arrays in (("input", input_arrays), ("target", target_arrays)):
        for name, spec in (arrays or {}).items():
            shape, scale = _spec_lists(spec)
            row = [_code(name), role, _e(triple_text(shape)), _e(triple_text(scale)), _e(_extent(shape, scale))]
            if tensors:
                t = tensors.get(name)
                row.append(_e(list(t)) if t is not None else "—")
            if levels:
                row.append(levels.get(name, "—"))
            rows.append(row)
    if not rows:
        return '<div class="cm-dim">no arrays</div>'
    note = f'<div class="cm-dim">axis order {_code(axis_order)}</div>' if axis_order else ""
    return html_table(headers, rows) + note


# -- value transforms ---------------------------------------------------------------------------
_WHERE_CLASS = {"engine": "cm-ok", "skipped (identity)": "cm-no"}


def _plan_html(plan: Sequence[Mapping[str, str]]) -> str:
    if not plan:
        return '<div class="cm-dim">none</div>'
    rows = []
    for row in plan:
        where = str(row.get("where", ""))
        cls = _WHERE_CLASS.get(where, "")
        cell = f'<span class="{cls}">{_e(where)}</span>' if cls else _e(where)
        rows.append([_code(row.get("arrays", "")), f'<td class="cm-wrap">{_e(row.get("transform", ""))}</td>', cell])
    return html_table(["arrays", "transform", "runs in"], rows)


def _plan_text(plan: Sequence[Mapping[str, str]]) -> str:
    if not plan:
        return "none"
    return "; ".join(f"{r.get('arrays')}: {r.get('transform')} [{r.get('where')}]" for r in plan)


def _plan_of(dataset: Any) -> list[dict[str, str]]:
    try:
        return list(dataset.value_transform_plan)
    except Exception:
        return []


# -- datasets -----------------------------------------------------------------------------------
def _volume_levels(path: str) -> list[dict[str, Any]] | None:
    """The multiscale metadata of ``path`` (no voxels are read), or None."""
    try:
        from .. import _engine

        return list(_engine.Volume(path).levels)
    except Exception:
        return None


def _level_label(levels: list[dict[str, Any]] | None, index: int | None) -> str:
    if index is None:
        return "—"
    if levels is not None and 0 <= index < len(levels):
        lv = levels[index]
        return f"{_code(lv.get('path', index))} {_e(triple_text(lv.get('voxel_size'), '×'))} nm"
    return f"level {_e(index)}"


@_safe(lambda d: _minimal_text(d))
def dataset_text(dataset: Any) -> str:
    """A few lines: paths, classes and length (the first line), class markings, arrays and
    the levels read."""
    first = (
        f"CellMapDataset(raw={dataset.raw_path!r}, target={dataset.target_path!r}, "
        f"classes={dataset.classes}, len={len(dataset)})"
    )
    try:
        levels = {name: f"level {lv}" for name, lv in dataset.input_levels.items()}
    except Exception:
        levels = {}
    lines = [first]
    if dataset.classes:
        lines.append("  " + _class_summary_text(dataset))
    else:
        lines.append("  raw only (no classes)")
    lines.append("  " + _arrays_text(dataset.input_arrays, dataset.target_arrays, levels))
    return "\n".join(lines)


def _dataset_classes_html(dataset: Any, label_levels: Mapping[str, Any] | None) -> str:
    try:
        per_array = dataset.target_levels
    except Exception:
        per_array = {}
    headers = ["class", "", "status", "target values"] + [f"level ({name})" for name in per_array]
    rows = []
    for k, c in enumerate(dataset.classes):
        status, related = class_status(dataset, c)
        if status == ANNOTATED:
            source = "label volume " + _code(dataset.target_template.format(label=c)) if dataset.target_template else ""
        elif status == INFERRED:
            source = "0 where " + ", ".join(_code(r) for r in related) + " is labelled; unknown elsewhere"
        else:
            source = f"unknown everywhere ({_e(number_text(getattr(dataset, 'empty_value', math.nan)))})"
        row = [_code(c), _mark(status), f'<span class="{_CSS_CLASS[status]}">{_e(status)}</span>',
               f'<td class="cm-wrap">{source}</td>']
        for levels in per_array.values():
            index = levels[k] if k < len(levels) else None
            row.append(_level_label((label_levels or {}).get(c), index))
        rows.append(row)
    counts = {s: sum(1 for c in dataset.classes if class_status(dataset, c)[0] == s) for s in (ANNOTATED, INFERRED, ABSENT)}
    summary = (f"Classes ({len(dataset.classes)}: {counts[ANNOTATED]} annotated, {counts[INFERRED]} inferred negative, "
               f"{counts[ABSENT]} absent)")
    return _details(_e(summary), html_table(headers, rows) + _LEGEND)


def _dataset_body(dataset: Any, deep: bool = True) -> str:
    n = len(dataset)
    head = (f'<div class="cm-head"><b>CellMapDataset</b> · {n:,} samples · {len(dataset.classes)} classes · '
            f'<span class="cm-dim">coordinate frame {_e(_frame())}</span></div>')
    paths = _kv_table([("raw", _code(dataset.raw_path)), ("target", _code(dataset.target_path or "—"))])
    raw_levels = _volume_levels(dataset.raw_path) if deep else None
    try:
        levels = {name: _level_label(raw_levels, lv) for name, lv in dataset.input_levels.items()}
    except Exception:
        levels = {}
    try:
        tensors = dict(dataset.engine.sample_shapes)
    except Exception:
        tensors = {}
    if dataset.classes:
        label_levels: dict[str, Any] = {}
        if deep and dataset.target_template:
            for c in dataset.annotated_classes[:64]:
                if c in dataset.classes:
                    label_levels[c] = _volume_levels(dataset.target_template.format(label=c))
        classes = _dataset_classes_html(dataset, label_levels)
        try:
            for name, per_class in dataset.target_levels.items():
                read = sorted({(lv, c) for c, lv in zip(dataset.classes, per_class) if lv is not None}, key=lambda t: t[0])
                seen: dict[int, str] = {}
                for lv, c in read:
                    seen.setdefault(lv, _level_label(label_levels.get(c), lv))
                levels[name] = ("labels " + ", ".join(seen.values())) if seen else "— (no annotated class)"
        except Exception:
            pass
    else:
        classes = _details("Classes", '<div class="cm-dim">none: raw only (every target array is a raw read)</div>')
    arrays = _details("Arrays", _arrays_html(dataset.input_arrays, dataset.target_arrays, dataset.axis_order, tensors, levels))
    plan = _plan_of(dataset)
    transforms = _details(_e(f"Value transforms ({len(plan)})"), _plan_html(plan), open_=bool(plan))
    geometry_items = [
        ("bounding box", _box(dataset.bounding_box)),
        ("sampling box", _box(dataset.sampling_box)),
        ("sample grid", _e(triple_text(dataset.engine.grid)) + " (z × y × x)"),
        ("pad", _e(dataset.pad)),
        ("axis order", _code(dataset.axis_order)),
        ("coordinate frame", _e(_frame())),
        ("spatial augmentation", _code(json.dumps(dataset.spatial_transforms)) if dataset.spatial_transforms and dataset.is_train else "off"),
        ("raw interpolation", _e(dataset.raw_interpolation)),
        ("empty value", _e(number_text(dataset.empty_value))),
        ("class relations", _code(json.dumps(dataset.class_relation_dict)) if dataset.class_relation_dict else "none"),
        ("device", _e(dataset.device or "cpu (default)")),
        ("seed", _e(dataset.seed)),
    ]
    geometry = _details("Geometry and settings", _kv_table(geometry_items), open_=False)
    return head + paths + classes + arrays + transforms + geometry


@_safe(dataset_text)
def dataset_html(dataset: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapDataset`: paths, classes (annotated /
    inferred negative / absent, with the label level read), arrays (shape, nm, level read),
    value transforms and where they run, geometry and settings."""
    return _wrap(_dataset_body(dataset))


# -- several datasets ---------------------------------------------------------------------------
def _coverage_html(datasets: Sequence[Any], classes: Sequence[str], offset: Callable[[int], int] | None = None) -> str:
    """Crops × classes: ✓ annotated, ¬ inferred negative, · absent; with each crop's length and
    input level(s)."""
    if not datasets:
        return '<div class="cm-dim">no datasets</div>'
    headers = ["#", "crop", "samples", "raw level"]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    head += "".join(f'<th class="cm-c" title="{_e(c)}">{_e(c)}</th>' for c in classes)
    rows = []
    totals = {s: [0] * len(classes) for s in (ANNOTATED, INFERRED)}
    for d, dataset in enumerate(datasets):
        statuses = _statuses(dataset, classes)
        for k, (status, _) in enumerate(statuses):
            if status in totals:
                totals[status][k] += 1
        if d >= MAX_ROWS:
            continue
        try:
            level = ", ".join(str(v) for v in dataset.input_levels.values())
        except Exception:
            level = "—"
        title = f"raw: {dataset.raw_path}\ntarget: {dataset.target_path}"
        cells = [f"<td>{d}</td>", f'<td title="{_e(title)}">{_e(_crop_name(dataset))}</td>',
                 f"<td>{len(dataset):,}</td>", f"<td>{_e(level)}</td>"]
        for c, (status, related) in zip(classes, statuses):
            tip = f"{c}: {status}" + (f" (exclusive with {', '.join(related)})" if related else "")
            cells.append(f'<td class="cm-c">{_mark(status, tip)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    if len(datasets) > MAX_ROWS:
        rows.append(f'<tr><td colspan="{len(headers) + len(classes)}" class="cm-dim">… and '
                    f"{len(datasets) - MAX_ROWS} more crops</td></tr>")
    foot = f'<tr><th colspan="{len(headers)}">annotated in (inferred in)</th>'
    for k, c in enumerate(classes):
        a, i = totals[ANNOTATED][k], totals[INFERRED][k]
        foot += f'<td class="cm-c">{a}/{len(datasets)}' + (f" ({i})" if i else "") + "</td>"
    foot += "</tr>"
    table = (f'<table class="cm-matrix"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
             f"<tfoot>{foot}</tfoot></table>")
    return table + _LEGEND


def _plans_html(datasets: Sequence[Any]) -> tuple[str, int]:
    """The value-transform plans of ``datasets``, once per distinct plan."""
    groups: dict[str, tuple[list[dict[str, str]], int]] = {}
    for dataset in datasets:
        plan = _plan_of(dataset)
        key = json.dumps(plan, sort_keys=True, default=str)
        groups[key] = (plan, groups.get(key, (plan, 0))[1] + 1)
    if not groups:
        return '<div class="cm-dim">no datasets</div>', 0
    if len(groups) == 1:
        plan = next(iter(groups.values()))[0]
        return _plan_html(plan), len(plan)
    parts = [f'<div class="cm-dim">{count} dataset(s):</div>{_plan_html(plan)}' for plan, count in groups.values()]
    return "".join(parts), max(len(p) for p, _ in groups.values())


def _datasets_text(datasets: Sequence[Any]) -> str:
    names = [f"{_crop_name(d)} (len={len(d)})" for d in datasets[:MAX_TEXT_ITEMS]]
    if len(datasets) > MAX_TEXT_ITEMS:
        names.append(f"… +{len(datasets) - MAX_TEXT_ITEMS} more")
    return ", ".join(names) or "none"


def _coverage_text(datasets: Sequence[Any], classes: Sequence[str]) -> str:
    parts = []
    for c in classes:
        statuses = [class_status(d, c)[0] for d in datasets]
        a, i = statuses.count(ANNOTATED), statuses.count(INFERRED)
        parts.append(f"{c} {a}/{len(datasets)}" + (f" (+{i} inferred)" if i else ""))
    return ", ".join(parts) or "none"


@_safe(lambda m: _minimal_text(m))
def multidataset_text(multi: Any) -> str:
    """A few lines: number of datasets, classes and length (the first line), crops, class
    coverage (annotated crops per class) and arrays."""
    lines = [f"CellMapMultiDataset({len(multi.datasets)} datasets, classes={multi.classes}, len={len(multi)})"]
    lines.append("  crops: " + _datasets_text(multi.datasets))
    if multi.classes and multi.datasets:
        lines.append("  annotated in: " + _coverage_text(multi.datasets, multi.classes))
    lines.append("  " + _arrays_text(multi.input_arrays, multi.target_arrays))
    return "\n".join(lines)


def _multi_body(multi: Any, title: str = "CellMapMultiDataset") -> str:
    datasets = list(multi.datasets)
    head = (f'<div class="cm-head"><b>{_e(title)}</b> · {len(multi):,} samples · {len(datasets)} datasets · '
            f'{len(multi.classes)} classes · <span class="cm-dim">coordinate frame {_e(_frame())}</span></div>')
    axis_order = datasets[0].axis_order if datasets else None
    try:
        tensors = dict(datasets[0].engine.sample_shapes) if datasets else {}
    except Exception:
        tensors = {}
    arrays = _details("Arrays", _arrays_html(multi.input_arrays, multi.target_arrays, axis_order, tensors))
    coverage = _details(_e(f"Class coverage ({len(datasets)} crops × {len(multi.classes)} classes)"),
                        _coverage_html(datasets, multi.classes))
    plans, n = _plans_html(datasets)
    transforms = _details(_e(f"Value transforms ({n})"), plans, open_=False)
    rows = [[str(d), f'<td class="cm-wrap">{_code(ds.raw_path)}</td>', f'<td class="cm-wrap">{_code(ds.target_path)}</td>',
             f"{len(ds):,}"] for d, ds in enumerate(datasets[:MAX_ROWS])]
    more = (f'<div class="cm-dim">… and {len(datasets) - MAX_ROWS} more</div>' if len(datasets) > MAX_ROWS else "")
    paths = _details("Paths", html_table(["#", "raw", "target", "samples"], rows) + more, open_=False)
    return head + arrays + coverage + transforms + paths


@_safe(multidataset_text)
def multidataset_html(multi: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapMultiDataset`: arrays, a crops × classes
    coverage table (✓ annotated, ¬ inferred negative, · absent), value transforms and paths."""
    return _wrap(_multi_body(multi))


def _inner_body(dataset: Any) -> str:
    # Told apart by what they hold (display imports none of the classes it shows).
    if hasattr(dataset, "datasets") and hasattr(dataset, "cumulative_sizes"):
        return _multi_body(dataset)
    if hasattr(dataset, "value_transform_plan"):
        return _dataset_body(dataset, deep=False)
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        return _subset_body(dataset)
    return f"<pre>{_e(repr(dataset))}</pre>"


@_safe(lambda s: _minimal_text(s))
def subset_text(subset: Any) -> str:
    """The inner dataset's text with ``N indices`` on its first line."""
    inner = repr(subset.dataset).split("\n")
    lines = [f"CellMapSubset({inner[0]}, {len(subset.indices)} indices)"] + inner[1:]
    return "\n".join(lines)


def _subset_body(subset: Any) -> str:
    n = len(subset.indices)
    total = len(subset.dataset)
    share = f" ({100.0 * n / total:.3g} %)" if total else ""
    head = (f'<div class="cm-head"><b>CellMapSubset</b> · {n:,} of {total:,} samples{share} of a '
            f"{_e(type(subset.dataset).__name__)}</div>")
    return head + _details(_e(type(subset.dataset).__name__), _inner_body(subset.dataset))


@_safe(subset_text)
def subset_html(subset: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapSubset`: its size and the dataset it selects from."""
    return _wrap(_subset_body(subset))


# -- splits -------------------------------------------------------------------------------------
def _split_source(split: Any) -> str:
    if getattr(split, "csv_path", None):
        return f"CSV {os.fspath(split.csv_path)}"
    if getattr(split, "dataset_dict", None):
        return "dataset_dict"
    if split.train_datasets or split.validation_datasets:
        return "datasets"
    return "none (empty split)"


@_safe(lambda s: _minimal_text(s))
def datasplit_text(split: Any) -> str:
    """A few lines: dataset counts, classes and skipped rows (the first line), the crops of each
    usage, arrays and the source."""
    lines = [
        f"CellMapDataSplit(train={len(split.train_datasets)} datasets, validate={len(split.validation_datasets)} datasets, "
        f"classes={split.classes}, skipped={len(split.skipped_rows)})"
    ]
    for usage, datasets in (("train", split.train_datasets), ("validate", split.validation_datasets)):
        lines.append(f"  {usage} (len={sum(len(d) for d in datasets)}): {_datasets_text(datasets)}")
    lines.append("  " + _arrays_text(split.input_arrays, split.target_arrays))
    lines.append(f"  source: {_split_source(split)}")
    return "\n".join(lines)


@_safe(datasplit_text)
def datasplit_html(split: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapDataSplit`: source, arrays, a coverage table
    per usage, the value transforms of each usage, and the rows that were skipped (and why)."""
    train, val = list(split.train_datasets), list(split.validation_datasets)
    head = (f'<div class="cm-head"><b>CellMapDataSplit</b> · train: {len(train)} datasets '
            f"({sum(len(d) for d in train):,} samples) · validate: {len(val)} datasets "
            f"({sum(len(d) for d in val):,} samples) · {len(split.classes)} classes · "
            f"{len(split.skipped_rows)} skipped · "
            f'<span class="cm-dim">coordinate frame {_e(_frame())}</span></div>')
    settings = _kv_table([
        ("source", _code(_split_source(split))),
        ("pad", _e(split.pad)),
        ("spatial augmentation", _code(json.dumps(split.spatial_transforms, default=str)) if split.spatial_transforms else "off"),
        ("class relations", _code(json.dumps(split.class_relation_dict)) if split.class_relation_dict else "none"),
        ("device", _e(split.device or "cpu (default)")),
    ])
    axis_order = (train + val)[0].axis_order if train or val else None
    arrays = _details("Arrays", _arrays_html(split.input_arrays, split.target_arrays, axis_order))
    parts = [head, settings, arrays]
    for usage, datasets in (("Train", train), ("Validate", val)):
        parts.append(_details(_e(f"{usage}: class coverage ({len(datasets)} crops × {len(split.classes)} classes)"),
                              _coverage_html(datasets, split.classes), open_=bool(datasets)))
    for usage, datasets in (("train", train), ("validate", val)):
        plans, n = _plans_html(datasets)
        parts.append(_details(_e(f"Value transforms, {usage} ({n})"), plans, open_=False))
    if split.skipped_rows:
        rows = [[_e(r.get("usage", "")), f'<td class="cm-wrap">{_code(r.get("gt", ""))}</td>',
                 f'<td class="cm-wrap">{_e(r.get("reason", ""))}</td>'] for r in split.skipped_rows]
        parts.append(_details(_e(f"Skipped rows ({len(rows)})"), html_table(["usage", "gt", "reason"], rows)))
    return _wrap("".join(parts))


# -- loaders ------------------------------------------------------------------------------------
def _sampler_text(loader: Any) -> str:
    if loader.user_sampler is not None:
        return f"custom ({type(loader.user_sampler).__name__})"
    if loader.weighted_sampler and loader.is_train:
        return "class-balanced"
    if loader.is_train:
        return "shuffled"
    return "sequential"


def _samples(loader: Any) -> tuple[int, int]:
    total = len(loader.multi)
    return (len(loader.subset) if loader.subset is not None else total), total


@_safe(lambda l: _minimal_text(l))
def loader_text(loader: Any) -> str:
    """A few lines: datasets, batch size, batches, threads and device (the first line), the
    sampling and the arrays."""
    lines = [
        f"CellMapDataLoader({len(loader.multi.datasets)} datasets, batch_size={loader.batch_size}, "
        f"batches={len(loader)}, threads={loader.threads}, device={loader.device})"
    ]
    n, total = _samples(loader)
    of = f" of {total}" if loader.subset is not None else ""
    per_epoch = f", iterations_per_epoch={loader.iterations_per_epoch}" if loader.iterations_per_epoch else ""
    lines.append(f"  samples={n}{of}, sampler={_sampler_text(loader)}{per_epoch}, classes={loader.classes}")
    lines.append("  " + _arrays_text(loader.multi.input_arrays, loader.multi.target_arrays))
    return "\n".join(lines)


@_safe(loader_text)
def loader_html(loader: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapDataLoader`: batching, sampling, threads and
    device, then the dataset it loads (arrays, class coverage, value transforms)."""
    n, total = _samples(loader)
    head = (f'<div class="cm-head"><b>CellMapDataLoader</b> · {len(loader):,} batches of {loader.batch_size} · '
            f"{n:,} samples · {len(loader.multi.datasets)} datasets</div>")
    try:
        rank, world = loader.rank_and_world_size
    except Exception:
        rank, world = 0, 1
    items = [
        ("batch size", _e(loader.batch_size)),
        ("batches per epoch", _e(f"{len(loader):,}")),
        ("samples", _e(f"{n:,}" + (f" of {total:,} (subset)" if loader.subset is not None else ""))),
        ("iterations per epoch", _e(loader.iterations_per_epoch) if loader.iterations_per_epoch else "— (one pass)"),
        ("sampler", _e(_sampler_text(loader))),
        ("augmentation", "on" if loader.is_train else "off"),
        ("drop last", _e(loader.drop_last)),
        ("engine threads", _e(loader.threads)),
        ("prefetch", _e(f"{loader.prefetch} batches")),
        ("device", _e(loader.device or "cpu")),
        ("rank / world size", _e(f"{rank} / {world}")),
        ("seed", _e(loader.seed)),
        ("classes", ", ".join(_code(c) for c in loader.classes) or "none"),
        ("metadata", _e(loader.return_metadata)),
    ]
    if tuple(loader.worker_shard) != (0, 1):
        items.append(("worker shard", _e(f"{loader.worker_shard[0]} of {loader.worker_shard[1]}")))
    dataset = loader.dataset
    inner = _details(_e(f"Dataset ({type(dataset).__name__})"), _inner_body(dataset))
    return _wrap(head + _kv_table(items) + inner)


# -- images -------------------------------------------------------------------------------------
def _requested_patch(image: Any) -> tuple[list[float], list[int]]:
    """The image's requested voxel size and patch shape as (z, y, x) lists."""
    return list(image.scale.values()), list(image.output_shape.values())


def _image_level(image: Any) -> tuple[int, str]:
    level = int(image.scale_level)
    levels = image.levels
    path = levels[level].get("path", level) if 0 <= level < len(levels) else level
    return level, f"{path}, {triple_text(levels[level].get('voxel_size'), 'x')} nm" if 0 <= level < len(levels) else str(path)


@_safe(lambda i: _minimal_text(i))
def image_text(image: Any) -> str:
    """One line: path, class, requested scale and shape, the level read (index, path, voxel
    size) and padding."""
    level, label = _image_level(image)
    scale, shape = _requested_patch(image)
    return (
        f"CellMapImage({image.path!r}, class={image.label_class!r}, scale={scale}, "
        f"shape={shape}, level={level} ({label}), pad={image.pad})"
    )


@_safe(image_text)
def image_html(image: Any) -> str:
    """The HTML of a :class:`~cellmap_data.CellMapImage`: path, class, requested patch, the
    level read among the multiscale levels, padding, interpolation and value transform."""
    level, _ = _image_level(image)
    scale, shape = _requested_patch(image)
    head = (f'<div class="cm-head"><b>CellMapImage</b> · {_code(image.label_class)} · '
            f'<span class="cm-dim">coordinate frame {_e(_frame())}</span></div>')
    items = [
        ("path", _code(image.path)),
        ("class", _code(image.label_class)),
        ("voxel size (nm)", _e(triple_text(scale)) + " (z × y × x)"),
        ("shape (voxels)", _e(triple_text(shape))),
        ("extent (nm)", _e(_extent(shape, scale))),
        ("axis order", _code("".join(image.axes))),
        ("pad", _e(image.pad) + (f" (value {_e(number_text(image.pad_value))})" if image.pad else "")),
        ("interpolation", _e(image.interpolation)),
        ("value transform", _e(_callable_name(image.value_transform))),
        ("bounding box", _box(image.bounding_box)),
        ("device", _e(image.device or "cpu")),
    ]
    rows = []
    for k, lv in enumerate(image.levels):
        mark = '<span class="cm-read">◀ read</span>' if k == level else ""
        rows.append([str(k), _code(lv.get("path", k)), _e(triple_text(lv.get("voxel_size"))),
                     _e(triple_text(lv.get("shape"))), _e(triple_text(lv.get("chunks"))), _e(lv.get("dtype", "")),
                     _e(triple_text(lv.get("translation"))), mark])
    levels = _details(_e(f"Levels ({len(rows)})"),
                      html_table(["#", "path", "voxel size (nm)", "shape", "chunks", "dtype", "translation (nm)", ""], rows))
    return _wrap(head + _kv_table(items) + levels)
