"""The layers stay apart (issue 15): ``service`` and ``worker`` share only ``contract`` and never import
each other, the API process never loads torch, and OpenAPI shows a response model on every route.
The torch-free part of ``rib_core`` is a set of packages (issue 25): every module in them loads no
torch, they import no other package of ``rib_core``, and ``service`` and ``contract`` import nothing
of ``rib_core`` outside them.
The Python client (``rib_client``, issue 26) imports nothing of the project, and nothing of the
project imports it (``rib remote`` runs it in a new process).

Each import is checked in a fresh interpreter, so that what another test imported cannot hide a
dependency.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADED = "import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
# What the API process and the contract may use of the library: no module below them imports torch.
TORCH_FREE = ("rib_core.config", "rib_core.data", "rib_core.io")


def modules_after_import(module: str, storage: Path) -> set[str]:
    """Every module loaded by ``import module`` in a fresh interpreter (run from the repository root;
    ``storage`` is the results folder an app built on import uses)."""
    env = {"RIB_STORAGE_URI": str(storage), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", LOADED.format(module=module)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def _package(names: set[str], package: str) -> list[str]:
    return sorted(n for n in names if n == package or n.startswith(f"{package}."))


def test_the_api_imports_neither_worker_nor_torch(tmp_path: Path) -> None:
    loaded = modules_after_import("service.main", tmp_path)
    assert not _package(loaded, "worker")
    assert not _package(loaded, "torch") and not _package(loaded, "torchvision")
    assert "contract.tasks" in loaded  # it queues through the contract


@pytest.mark.parametrize("module", ["worker.tasks", "worker.__main__"])
def test_the_worker_never_imports_the_api(module: str, tmp_path: Path) -> None:
    assert not _package(modules_after_import(module, tmp_path), "service")


def test_the_contract_imports_neither_side_nor_torch(tmp_path: Path) -> None:
    loaded = modules_after_import("contract.tasks", tmp_path)
    assert not (_package(loaded, "service") or _package(loaded, "worker") or _package(loaded, "torch"))


@pytest.mark.parametrize("module", ["rib_client", "rib_client.cli"])
def test_the_client_imports_nothing_of_the_project(module: str, tmp_path: Path) -> None:
    loaded = modules_after_import(module, tmp_path)
    for layer in ("rib_core", "service", "worker", "contract", "torch", "numpy"):
        assert not _package(loaded, layer), (module, layer, _package(loaded, layer))
    assert "httpx" in loaded and "pydantic" in loaded


@pytest.mark.parametrize("module", ["rib_core.cli", "service.main", "worker.tasks"])
def test_nothing_of_the_project_imports_the_client(module: str, tmp_path: Path) -> None:
    assert not _package(modules_after_import(module, tmp_path), "rib_client")


def test_every_route_documents_a_success_body(tmp_path: Path) -> None:
    from contract.settings import Settings
    from service.app import create_app

    spec = create_app(Settings(storage_uri=str(tmp_path))).openapi()
    missing = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            bodies = [r.get("content", {}) for code, r in op["responses"].items() if code.startswith("2")]
            if not any(media.get("schema") for content in bodies for media in content.values()):
                missing.append(f"{method.upper()} {path}")
            elif path != "/metrics":
                schemas = [media["schema"] for content in bodies for media in content.values()]
                assert all(s.get("$ref") or s.get("anyOf") for s in schemas), (method, path, schemas)
    assert not missing, missing


def package_modules(packages: tuple[str, ...]) -> list[str]:
    """Every module of ``packages``, found on disk (a module added later is checked too)."""
    found = []
    for package in packages:
        folder = ROOT.joinpath(*package.split("."))
        assert (folder / "__init__.py").is_file(), f"{package} is no package"
        found += [package] + [m.name for m in pkgutil.walk_packages([str(folder)], f"{package}.")]
    return found


def library_imports(path: Path) -> set[str]:
    """The ``rib_core`` modules a file imports, wherever the import statement is (in a function or
    under ``TYPE_CHECKING`` too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rib_core":
            names |= {node.module} if node.module != "rib_core" else {f"rib_core.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "rib_core"}
    return names


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def test_the_torch_free_packages_load_no_torch(tmp_path: Path) -> None:
    modules = package_modules(TORCH_FREE)
    assert len(modules) > len(TORCH_FREE)
    loaded = modules_after_import(", ".join(modules), tmp_path)
    assert not _package(loaded, "torch") and not _package(loaded, "torchvision"), modules


def test_the_torch_free_packages_import_only_each_other() -> None:
    crossing = {}
    for package in TORCH_FREE:
        for path in ROOT.joinpath(*package.split(".")).rglob("*.py"):
            outside = {m for m in library_imports(path) if not _inside(m, TORCH_FREE)}
            if outside:
                crossing[str(path.relative_to(ROOT))] = sorted(outside)
    assert not crossing, crossing


@pytest.mark.parametrize("layer", ["service", "contract"])
def test_the_api_and_the_contract_use_only_the_torch_free_packages(layer: str) -> None:
    used = {}
    for path in (ROOT / layer).rglob("*.py"):
        outside = {m for m in library_imports(path) if not _inside(m, TORCH_FREE) and m != "rib_core.__version__"}
        if outside:
            used[str(path.relative_to(ROOT))] = sorted(outside)
    assert not used, used
