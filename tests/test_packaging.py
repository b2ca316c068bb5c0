"""The distribution installs beside the CellMap segmentation challenge toolbox.

The toolbox pins ``cellmap-data>=2026.2.19.2140`` (the reference's calendar versions) and
``zarr<3``.  So this drop-in carries a calendar version at least the reference's current
release, and its runtime requirements leave zarr-python out: zarr-python (>= 3) and
numcodecs only write the synthetic test data and come with the ``synthetic`` extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: The reference distribution's release this package stands in for (PyPI `cellmap-data`).
REFERENCE_RELEASE = Version("2026.3.20.1935")
#: What the segmentation challenge toolbox requires.
CHALLENGE_CELLMAP_DATA = SpecifierSet(">=2026.2.19.2140")
CHALLENGE_ZARR = "zarr<3"
ZARR_ONLY = {"zarr", "numcodecs"}


def _requirements(strings) -> list[Requirement]:
    return [Requirement(s) for s in strings]


def _names(requirements) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def _runtime_requirements() -> list[Requirement]:
    return _requirements(PROJECT["dependencies"])


# ----------------------------------------------------------------------------- metadata


def test_runtime_requirements_leave_zarr_out():
    assert "dependencies" not in PROJECT.get("dynamic", [])
    names = _names(_runtime_requirements())
    assert not names & ZARR_ONLY, f"runtime requirements must not pin {sorted(names & ZARR_ONLY)}"
    for requirement in _runtime_requirements():
        assert requirement.marker is None and not requirement.extras, str(requirement)


def test_synthetic_extra_brings_zarr3_and_the_test_extra_includes_it():
    extras = PROJECT["optional-dependencies"]
    synthetic = _requirements(extras["synthetic"])
    assert _names(synthetic) == ZARR_ONLY
    (zarr,) = [r for r in synthetic if canonicalize_name(r.name) == "zarr"]
    assert not zarr.specifier.contains("2.18.7") and zarr.specifier.contains("3.0.0")
    test = {str(r) for r in _requirements(extras["test"])}
    assert {str(r) for r in synthetic} <= test


def test_requirements_dev_installs_runtime_and_extras():
    lines = (REPO_ROOT / "requirements-dev.txt").read_text().splitlines()
    dev = {str(Requirement(line)) for line in (line.split("#", 1)[0].strip() for line in lines) if line}
    wanted = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    missing = {str(r) for r in _requirements(wanted)} - dev
    assert not missing, f"requirements-dev.txt lacks {sorted(missing)}"


def test_version_is_calendar_and_satisfies_the_challenge_pin():
    assert "version" not in PROJECT.get("dynamic", []), "the version is static, not Cargo.toml's"
    version = Version(PROJECT["version"])
    assert str(version) == PROJECT["version"], "normalised form, as pip and importlib.metadata show it"
    assert not (version.is_prerelease or version.is_devrelease or version.local)
    year, month, day = version.release[:3]
    assert 2026 <= year < 2100 and 1 <= month <= 12 and 1 <= day <= 31, version
    assert version >= REFERENCE_RELEASE
    assert CHALLENGE_CELLMAP_DATA.contains(version)
    assert PROJECT["name"] == "cellmap-data", "same distribution name: a drop-in"


def test_installed_version_is_the_pyprojects():
    import cellmap_data

    try:
        installed = installed_version("cellmap-data")
    except PackageNotFoundError:
        pytest.skip("cellmap-data is not installed (running from a bare source tree)")
    assert cellmap_data.__version__ == installed
    assert installed == PROJECT["version"], (
        f"installed metadata says {installed}, pyproject.toml {PROJECT['version']}: "
        "a stale build; rebuild with `make build`"
    )


# ----------------------------------------------------------------------------- resolution


def _pip_dry_run(*args: str) -> list[str]:
    """A pip command that resolves wheels only (no sdist builds) and gives up quickly offline."""
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
            "--quiet", "--disable-pip-version-check", "--timeout", "10", "--retries", "0", *args]


def _registry_or_skip() -> None:
    try:
        probe = subprocess.run(_pip_dry_run("--no-deps", "tqdm"), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 60 s")
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"pip cannot reach the package registry (or is unavailable): {tail[0]}")


def test_runtime_requirements_resolve_with_zarr2_and_zarr3(tmp_path):
    """pip resolves our runtime requirements together with ``zarr<3`` and with ``zarr>=3``.

    Dry runs with ``--report``: nothing is installed and, for wheels that publish it, only
    their metadata is fetched (torch's CUDA wheels are not downloaded).  The package itself
    is not built: its requirements are read from pyproject.toml (its version is checked
    against the challenge's pin above).

    With ``zarr<3``, the challenge's pin, the whole runtime set is resolved, torch included.
    With ``zarr>=3`` the set leaves torch and torchvision out: their resolution is most of
    the cost (~15 s of the ~18 s one full resolution takes on a 2-core machine; two full ones
    took 40-60 s side by side under load), they bound neither zarr nor numcodecs, and the
    full set with ``zarr>=3`` is what requirements-dev.txt installs into .venv on every
    ``make``.  The two resolutions run side by side.
    """
    _registry_or_skip()
    heavy = {"torch", "torchvision"}
    ours = _runtime_requirements()
    cases = {
        CHALLENGE_ZARR: ours,
        "zarr>=3": [r for r in ours if canonicalize_name(r.name) not in heavy],
    }
    runs = {}
    for index, (pin, requirements) in enumerate(cases.items()):
        report = tmp_path / f"report-{index}.json"
        command = _pip_dry_run("--report", str(report), *map(str, requirements), pin)
        runs[pin] = (report, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for pin, (report, process) in runs.items():
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for _, other in runs.values():
                other.kill()
            pytest.fail(f"pip's resolution with {pin!r} took over 240 s")
        assert process.returncode == 0, f"our requirements do not resolve with {pin!r}:\n{stderr[-3000:]}"
        chosen = {
            canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
            for item in json.loads(report.read_text())["install"]
        }
        assert Requirement(pin).specifier.contains(chosen["zarr"]), (pin, chosen["zarr"])
        for requirement in cases[pin]:
            name = canonicalize_name(requirement.name)
            assert name in chosen and requirement.specifier.contains(chosen[name], prereleases=True), requirement


# ----------------------------------------------------------------------------- synthetic without zarr


@pytest.mark.parametrize("case", ["missing", "zarr2"])
def test_synthetic_names_the_extra_without_zarr3(case, tmp_path, monkeypatch):
    from cellmap_data.tools.synthetic import make_synthetic_data

    if case == "missing":
        monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` raises ImportError
    else:
        old = types.ModuleType("zarr")
        old.__version__ = "2.18.7"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "zarr", old)
    out = tmp_path / "out"
    with pytest.raises(ImportError, match=r"pip install 'cellmap-data\[synthetic\]'") as raised:
        make_synthetic_data(out, size="tiny")
    assert ("2.18.7" in str(raised.value)) == (case == "zarr2")
    assert not out.exists(), "fails before writing anything"


def test_package_imports_without_zarr():
    """Everything but writing synthetic data works without zarr-python and numcodecs."""
    script = (
        "import sys\n"
        "sys.modules['zarr'] = None\n"
        "sys.modules['numcodecs'] = None\n"
        "import cellmap_data, cellmap_data.cli, cellmap_data.tools.synthetic, cellmap_data.writer\n"
        "for name in cellmap_data.__all__:\n"
        "    getattr(cellmap_data, name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
