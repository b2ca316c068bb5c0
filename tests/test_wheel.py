"""The distribution as users install it (``make wheel && make test-wheel``): one abi3 manylinux
wheel and an sdist in ``dist/``. The wheel holds the package, its stubs and ``py.typed``, the
license and nothing of tests or notebooks; it installs into a fresh virtual environment with
no cargo or maturin on PATH, runs the demo and imports every public module path from a folder
outside the clone, reports the version it was built with, lists its real dependencies, and
``pip check`` is clean beside the challenge toolbox's ``zarr<3``.

The fresh environments reuse this project's installed third-party packages (torch and the rest)
through a folder of links instead of downloading them again; only the pinned zarr 2 comes from
the package index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from test_import_paths import REFERENCE_MODULES

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
# Packages of the project's environment a user's environment does not get from us.
NOT_SHARED = ("cellmap_data", "maturin", "pip")


def wheel_path() -> Path:
    wheels = sorted(DIST.glob("cellmap_data-*.whl"))
    if not wheels:
        pytest.skip("no wheel in dist/ (make wheel)")
    return wheels[-1]


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def test_the_wheel_is_one_abi3_manylinux_build_with_stubs_license_and_nothing_else():
    wheel = wheel_path()
    tag = wheel.name.rsplit("-", 3)[1:]
    assert tag[0] == "cp310" and tag[1] == "abi3" and re.fullmatch(r"manylinux_2_\d+_x86_64\.whl", tag[2]), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    extensions = [n for n in names if n.endswith(".so")]
    assert extensions == ["cellmap_data/_engine.abi3.so"]
    assert {"cellmap_data/_engine.pyi", "cellmap_data/py.typed"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "notebooks/", "docs/")) or "__pycache__" in n]
    top = {n.split("/")[0] for n in names}
    assert top == {"cellmap_data", f"cellmap_data-{wheel_version(wheel)}.dist-info"}
    with zipfile.ZipFile(wheel) as z:
        extension = z.read("cellmap_data/_engine.abi3.so")
        metadata = z.read(f"cellmap_data-{wheel_version(wheel)}.dist-info/METADATA").decode()
    probe = DIST / "_engine_probe.so"
    probe.write_bytes(extension)
    try:
        sections = subprocess.run(["readelf", "-S", str(probe)], capture_output=True, text=True, check=True).stdout
    finally:
        probe.unlink()
    assert ".symtab" not in sections, "the extension is stripped"
    assert "Requires-Python: >=3.10" in metadata
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MB, extension {len(extension) / 2**20:.1f} MB")


def test_auditwheel_accepts_the_platform_tag():
    wheel = wheel_path()
    pytest.importorskip("auditwheel")
    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    platform = wheel.name.rsplit("-", 1)[1].removesuffix(".whl")
    text = " ".join(shown.stdout.split())
    assert f'consistent with the following platform tag: "{platform}"' in text or platform in text, shown.stdout


def test_the_sdist_holds_the_sources_and_not_the_tests():
    sdists = sorted(DIST.glob("cellmap_data-*.tar.gz"))
    assert sdists, "no sdist in dist/ (make wheel)"
    import tarfile

    with tarfile.open(sdists[-1]) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"pyproject.toml", "Cargo.toml", "Cargo.lock", "LICENSE", "README.md", "rust/engine/Cargo.toml",
            "rust/python/Cargo.toml", "cellmap_data/__init__.py", "cellmap_data/_engine.pyi"} <= names
    assert not [n for n in names if n.startswith(("tests/", "notebooks/"))]


# -- installing it ------------------------------------------------------------------------------
def shared_packages(root: Path, leave_out: tuple[str, ...]) -> Path:
    """A folder of links to this environment's installed packages, without the project itself
    (and `leave_out`): a fresh environment then reuses torch and the rest without downloading."""
    import site

    source = Path(site.getsitepackages()[0])
    view = root / "shared-site"
    view.mkdir()
    for entry in source.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.endswith(".pth") or name.startswith(tuple(p.replace("-", "_") for p in NOT_SHARED + leave_out)):
            continue
        (view / entry.name).symlink_to(entry)
    return view


def fresh_venv(root: Path, leave_out: tuple[str, ...] = ()) -> tuple[Path, dict[str, str]]:
    """A new virtual environment seeing the shared packages, and an environment whose PATH has
    neither cargo nor maturin."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # The venv's own setuptools would shadow the shared (newer) one torch requires.
    for entry in site_dir.iterdir():
        if entry.name.startswith(("setuptools", "_distutils_hack", "distutils-precedence")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (site_dir / "zz_shared.pth").write_text(str(shared_packages(root, leave_out)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "CARGO", "RUSTUP"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return python, env


def run(python: Path, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> str:
    done = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_installs_and_runs_without_a_rust_toolchain(tmp_path):
    wheel = wheel_path()
    python, env = fresh_venv(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert shutil.which("cargo", path=env["PATH"]) is None and shutil.which("maturin", path=env["PATH"]) is None
    started = time.perf_counter()
    # Every requirement is already there (shared), so nothing is downloaded.
    run(python, ["-m", "pip", "install", "--no-index", "-q", str(wheel)], env, outside)
    installed = time.perf_counter()
    demo = run(python, ["-m", "cellmap_data", "demo", "--out", str(tmp_path / "demo"), "--batches", "4"], env, outside)
    first_batch = time.perf_counter()
    assert "batch:" in demo and "samples/s" in demo, demo
    probe = json.dumps(sorted(REFERENCE_MODULES))
    report = json.loads(run(python, ["-c", (
        "import importlib, json, cellmap_data, shutil\n"
        f"modules = json.loads({probe!r})\n"
        "for m in modules: importlib.import_module(m)\n"
        "print(json.dumps({'file': cellmap_data.__file__, 'version': cellmap_data.__version__,"
        " 'cargo': shutil.which('cargo'), 'extension': cellmap_data._engine.__file__}))"
    )], env, outside).strip().splitlines()[-1])
    assert report["cargo"] is None
    assert Path(report["file"]).resolve().is_relative_to((tmp_path / "venv").resolve()), report
    assert report["extension"].endswith("_engine.abi3.so")
    assert report["version"] == wheel_version(wheel)
    shown = run(python, ["-m", "pip", "show", "cellmap-data"], env, outside)
    requires = {r.strip() for r in re.search(r"^Requires: (.*)$", shown, re.M).group(1).split(",") if r.strip()}
    assert requires == {"numpy", "torch", "torchvision", "pyarrow", "polars", "tqdm", "matplotlib"}, shown
    print(f"pip install {installed - started:.1f} s; demo to its first batches {first_batch - installed:.1f} s; "
          f"install to first batch {first_batch - started:.1f} s")


def test_pip_check_is_clean_beside_the_challenge_toolbox_zarr_pin(tmp_path):
    wheel = wheel_path()
    python, env = fresh_venv(tmp_path, leave_out=("zarr", "numcodecs"))
    run(python, ["-m", "pip", "install", "--no-index", "-q", str(wheel)], env, tmp_path)
    # zarr 2, as the toolbox pins it: from the package index.
    run(python, ["-m", "pip", "install", "-q", "zarr<3"], env, tmp_path)
    zarr_version = run(python, ["-c", "import zarr; print(zarr.__version__)"], env, tmp_path).strip()
    assert zarr_version.startswith("2."), zarr_version
    checked = run(python, ["-m", "pip", "check"], env, tmp_path)
    assert "No broken requirements found" in checked, checked


def test_pip_builds_the_same_wheel_from_the_sdist(tmp_path):
    """Where a Rust toolchain exists, ``pip`` builds the sdist into the wheel ``make wheel`` made:
    the same files for the same stable ABI (cargo's build folder is shared, so this is
    incremental). pip's build is for this machine only, so its platform tag is the plain
    ``linux_x86_64`` rather than the manylinux tag ``maturin build`` checks and gives."""
    wheel = wheel_path()
    sdist = sorted(DIST.glob("cellmap_data-*.tar.gz"))[-1]
    out = tmp_path / "built"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(sdist)],
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("cellmap_data-*.whl")
    assert built.name.rsplit("-", 1)[0] == wheel.name.rsplit("-", 1)[0]
    assert built.name.endswith("-linux_x86_64.whl") or built.name == wheel.name
    listing = lambda w: sorted(n for n in zipfile.ZipFile(w).namelist() if not n.endswith("RECORD"))  # noqa: E731
    assert listing(built) == listing(wheel)
