"""The type stubs of the compiled engine (``cellmap_data/_engine.pyi``) match the module.

``mypy.stubtest`` imports ``cellmap_data._engine`` and compares every class, method, property,
function and constant (names, parameters, defaults, ``@final``) with the stub, so a change to
the binding that is not reflected in the stub fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cellmap_data"

pytest.importorskip("mypy", reason="mypy is needed to check the stubs (pip install mypy)")


def test_typed_package_markers_exist():
    assert (PACKAGE / "py.typed").is_file(), "PEP 561 marker cellmap_data/py.typed is missing"
    assert (PACKAGE / "_engine.pyi").is_file(), "stubs of the compiled engine are missing"


def test_engine_stubs_match_the_compiled_module(tmp_path):
    # Run outside the source tree (mypy leaves a .mypy_cache in its working directory) but
    # check this checkout's package and stubs.
    paths = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy-cache"), PYTHONPATH=paths, MYPYPATH=str(ROOT))
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy.stubtest", "cellmap_data._engine",
            "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt"),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"stubtest found differences:\n{result.stdout}\n{result.stderr}"


def test_stub_names_match_runtime_all():
    import cellmap_data._engine as engine

    stub = (PACKAGE / "_engine.pyi").read_text()
    for name in engine.__all__:
        assert f'"{name}"' in stub, f"{name} is exported by the engine but not listed in the stub's __all__"


# Modules owned elsewhere that do not type-check yet are left out (and reported); add them back
# once they pass.
NOT_YET_TYPED: set[str] = set()


def test_package_type_checks_against_the_stubs(tmp_path):
    """The package's own annotations agree with the engine stubs and with each other (what a
    user running mypy on a training script relies on, since the package ships ``py.typed``)."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("cellmap_data",) + path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in NOT_YET_TYPED:
            modules.append(name)
    args = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary"]
    for module in modules:
        args += ["-m", module]
    paths = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy-cache"), PYTHONPATH=paths, MYPYPATH=str(ROOT))
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mypy found type errors:\n{result.stdout}\n{result.stderr}"
