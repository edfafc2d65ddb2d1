"""The import rule of docs/architecture.md: every import points down the house.

Each module of the project belongs to the part named by its longest matching prefix in
``ALLOWED``; it may import its own part and the parts listed for it, nothing else. Imports
inside functions and under ``TYPE_CHECKING`` count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("turbofs", "index_builder", "server")

#: part -> the parts it may import (besides itself). The command layer may import anything.
ALLOWED: dict[str, frozenset[str]] = {
    "turbofs.core": frozenset(),
    "turbofs.proto": frozenset(),
    "turbofs.erofs": frozenset({"turbofs.core"}),
    "turbofs.node": frozenset({"turbofs.core"}),
    "index_builder": frozenset({"turbofs.core"}),
    "server": frozenset({"turbofs.core", "index_builder"}),
    "turbofs.mount.ctl": frozenset({"turbofs.core"}),
    "turbofs.mount": frozenset({"turbofs.core", "turbofs.node", "turbofs.erofs", "turbofs.mount.ctl"}),
    "turbofs.snapshotter": frozenset({"turbofs.core", "turbofs.proto", "turbofs.mount.ctl"}),
    "turbofs": frozenset(),  # the package's own __init__
}
#: ``turbofs.mount.spare`` is a process entry point: a pre-started daemon that runs the CLI.
COMMAND_LAYER = frozenset({"turbofs.cli", "turbofs.push", "turbofs.containerd", "turbofs.mount.spare"})

#: Parts that must load without FUSE or an event loop: the core, the node core, and the
#: mount client that the CLI and the snapshotter import.
FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "turbofs.core": frozenset({"pyfuse3", "trio", "grpc", "aiohttp"}),
    "turbofs.node": frozenset({"pyfuse3", "aiohttp", "grpc"}),
    "turbofs.erofs": frozenset({"pyfuse3", "trio", "aiohttp", "grpc"}),
    "turbofs.mount.ctl": frozenset({"pyfuse3", "trio", "httpx"}),
    "index_builder": frozenset({"pyfuse3", "trio", "aiohttp", "grpc"}),
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _part(module: str, table: dict[str, frozenset[str]]) -> str | None:
    best = None
    for name in table:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` counts as importing pkg.mod; pkg's own __init__ runs
            # too, which test_mount_package_init_is_empty keeps harmless for turbofs.mount
            names = [f"{base}.{alias.name}" for alias in node.names]
            modules = [n for n in names if n in MODULES]
            found.extend((node.lineno, n) for n in modules)
            if len(modules) < len(names):
                found.append((node.lineno, base))
    return found


MODULES = _modules()


def test_every_module_belongs_to_a_part() -> None:
    orphans = [m for m in MODULES if m not in COMMAND_LAYER and _part(m, ALLOWED) is None]
    assert not orphans, f"modules outside every part of ALLOWED: {orphans}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in COMMAND_LAYER))
def test_imports_point_down(module: str) -> None:
    own = _part(module, ALLOWED)
    assert own is not None
    bad = []
    for line, target in _imports(module, MODULES[module]):
        if target.split(".")[0] not in PROJECT or target not in MODULES:
            continue  # third party, or `from pkg import name` naming no module
        part = _part(target, {**ALLOWED, **dict.fromkeys(COMMAND_LAYER, frozenset())})
        if part in (own, None) or part in ALLOWED[own]:
            continue
        if target == "turbofs" and module.startswith("turbofs."):
            continue  # `from turbofs import __version__`
        bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({part})")
    assert not bad, f"{module} ({own}) may import only {sorted(ALLOWED[own]) or 'itself'}:\n" + "\n".join(bad)


@pytest.mark.parametrize("part", sorted(FORBIDDEN_THIRD_PARTY))
def test_light_parts_stay_light(part: str) -> None:
    banned = FORBIDDEN_THIRD_PARTY[part]
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m in MODULES
        if _part(m, FORBIDDEN_THIRD_PARTY) == part
        for line, target in _imports(m, MODULES[m])
        if target.split(".")[0] in banned
    ]
    assert not bad, f"{part} must not import {sorted(banned)}:\n" + "\n".join(bad)


def test_mount_package_init_is_empty() -> None:
    """``from turbofs.mount import ctl`` (CLI, snapshotter) must not load FUSE or trio."""
    assert _imports("turbofs.mount", MODULES["turbofs.mount"]) == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a core module is reported."""
    fake = tmp_path / "fake.py"
    fake.write_text("from index_builder.builder import build\nimport turbofs.mount.daemon\n")
    found = [t for _, t in _imports("turbofs.core.fake", fake)]
    assert "index_builder.builder" in found and "turbofs.mount.daemon" in found
    assert _part("index_builder.builder", ALLOWED) not in ALLOWED["turbofs.core"]
