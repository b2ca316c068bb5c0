"""Parsing of dataset paths."""

from __future__ import annotations

__all__ = ["split_target_path"]

LABEL_PLACEHOLDER = "{label}"


def split_target_path(path: str) -> tuple[str, list[str]]:
    """Split a target path with a bracketed class list into template and classes.

    ``"/d/x.zarr/recon-1/labels/groundtruth/crop234/[ecs,mito]"`` gives
    ``("/d/x.zarr/recon-1/labels/groundtruth/crop234/{label}", ["ecs", "mito"])``.
    The bracket group may be followed by a suffix (``".../[a,b]/s0"`` gives
    template ``".../{label}/s0"``); whitespace around class names is stripped.
    Without brackets the template is ``path`` itself and the class list is
    its last path component.

    Raises:
        ValueError: unbalanced, nested or repeated brackets, an empty list,
            or an empty class name.  The message names the path.
    """
    opening = path.count("[")
    closing = path.count("]")
    if opening == 0 and closing == 0:
        last_component = path.rstrip("/").rsplit("/", 1)[-1].strip()
        if not last_component:
            raise ValueError(f"target path {path!r} has no last component to use as class name")
        return path, [last_component]
    if opening != 1 or closing != 1:
        raise ValueError(
            f"target path {path!r} must contain exactly one [class,list] group "
            f"(found {opening} '[' and {closing} ']')"
        )
    start = path.index("[")
    end = path.index("]")
    if end < start:
        raise ValueError(f"target path {path!r} has ']' before '['")
    names = [name.strip() for name in path[start + 1 : end].split(",")]
    if any(not name for name in names):
        raise ValueError(f"target path {path!r} has an empty class list or an empty class name")
    template = path[:start] + LABEL_PLACEHOLDER + path[end + 1 :]
    return template, names
