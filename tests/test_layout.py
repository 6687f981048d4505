"""The architecture, checked: services do not import each other, the pure cores import no torch
(or no I/O), and no product file outgrows a reading."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("services", "shared", "kernels", "cli", "benchmarks")
MAX_LINES = 400


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another(service: str) -> None:
    others = {f"disagg.services.{s}" for s in SERVICES if s != service}
    for path in (ROOT / "services" / service).rglob("*.py"):
        bad = {m for m in imported_modules(path) if ".".join(m.split(".")[:3]) in others}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_shared_code_imports_no_service() -> None:
    for path in (ROOT / "shared").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith(("disagg.services", "disagg.cli"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


PURE = [
    # module, what it must not load
    ("disagg.shared.engine.scheduler", ("torch",)),
    ("disagg.shared.engine.block_pool", ("torch",)),
    ("disagg.shared.protocol.messages", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.shared.protocol.kv_wire", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.shared.cluster", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.services.scheduler.placement", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.services.scheduler.hold", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.services.scheduler.rates", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.services.gateway.migration", ("torch", "zmq", "nats")),
    ("disagg.shared.rates", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.services.planner.core", ("torch", "zmq", "nats", "asyncio")),
    ("disagg.cli.supervisor", ("torch", "zmq", "nats", "asyncio", "subprocess")),
]


@pytest.mark.parametrize(("module", "banned"), PURE, ids=[m for m, _ in PURE])
def test_pure_cores_load_no_io_or_torch(module: str, banned: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}; "
        f"loaded = [m for m in {banned!r} if m in sys.modules]; "
        "print(','.join(loaded)); sys.exit(1 if loaded else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{module} loads {out.stdout.strip() or out.stderr[-500:]}"


def test_no_product_file_over_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for folder in PRODUCT
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"
