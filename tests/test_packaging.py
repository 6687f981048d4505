"""The distribution: one wheel `disagg` whose packages map onto the top-level folders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "services": "disagg.services",
    "shared": "disagg.shared",
    "kernels": "disagg.kernels",
    "cli": "disagg.cli",
    "benchmarks": "disagg.benchmarks",
}


def source_packages() -> set[str]:
    """Every folder with an __init__.py under the mapped top-level folders, as a dotted name."""
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    return found


def test_wheel_holds_every_subpackage(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("disagg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("__init__.py")}
    assert source_packages() <= in_wheel, f"missing from the wheel: {source_packages() - in_wheel}"
    modules = {n for n in names if n.endswith(".py")}
    for folder, package in FOLDERS.items():
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder).as_posix()
            assert f"{package.replace('.', '/')}/{rel}" in modules, rel
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "disagg = disagg.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "disagg.cli.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "tiny-model" in out.stdout and "generate" in out.stdout
