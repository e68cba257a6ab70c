"""The package layering: no package imports one above it (lazily or not), and no import cycle.

Every module of ``falqon_dist/`` is parsed (``ast``: top-level and function-local imports alike) and
each import of another ``falqon_dist`` package is checked against :data:`ALLOWED`, the layering
written out::

    foundations (config_checks, files, hub_names) → fp8 → method → distributed → export
      → baselines → methods (the registry) → data → models → train → integrations

``launch/`` scripts may import anything. The root ``falqon_dist/__init__.py`` runs on every import of
any submodule, so it may import only the method and what lies below it, and the export's
``save_pretrained`` route (which registers itself with the method and imports nothing heavy:
checked below).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "falqon_dist"

FOUNDATIONS = {"config_checks", "files", "hub_names"}
#: Each unit (a subpackage or a top-level module of falqon_dist) and the units it may import.
ALLOWED: dict[str, set[str]] = {"config_checks": set(), "files": set(), "hub_names": set()}
_ORDER = [
    "fp8",
    "method",
    "distributed",
    "export",
    "baselines",
    "methods",
    "data",
    "models",
    "train",
    "integrations",
]
for _index, _unit in enumerate(_ORDER):
    ALLOWED[_unit] = FOUNDATIONS | set(_ORDER[:_index])
ALLOWED["falqon_dist"] = FOUNDATIONS | {"fp8", "method", "export"}  # the root __init__


def unit_of(module: str) -> str:
    """``falqon_dist.train.trainer`` → ``train``; the root package is ``falqon_dist``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of ``falqon_dist`` in ``path``, at any depth."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from falqon_dist import method`` imports the unit ``method``, not just the root.
            if target == "falqon_dist":
                found += [(node.lineno, f"falqon_dist.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, target) for line, target in found if target.split(".")[0] == "falqon_dist"]


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """``(importer unit, imported unit)`` → the ``file:line → target`` imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path))
        for line, target in imports_of(path):
            imported = unit_of(target)
            if imported != source:
                edges.setdefault((source, imported), []).append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} → {target}"
                )
    return edges


def test_every_unit_is_in_the_table():
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units <= set(ALLOWED), (
        f"add these to ALLOWED (where do they sit?): {sorted(units - set(ALLOWED))}"
    )


def test_no_package_imports_one_above_it():
    offences = [
        where
        for (source, imported), places in sorted(unit_edges().items())
        if imported not in ALLOWED.get(source, set())
        for where in places
    ]
    assert not offences, "imports against the layering:\n" + "\n".join(offences)


def test_importing_the_package_stays_light():
    """``import falqon_dist`` (which every submodule import runs) loads the method and the export's
    ``save_pretrained`` route, never DeepSpeed, the exporter, the distributed glue or the trainer."""
    code = (
        "import sys, falqon_dist\n"
        "heavy = [m for m in ('deepspeed', 'falqon_dist.distributed', 'falqon_dist.export.exporter', "
        "'falqon_dist.train', 'transformers') if m in sys.modules]\n"
        "print(heavy)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for source, imported in unit_edges():
        graph.setdefault(source, set()).add(imported)
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])
    assert not cycles, "import cycles between packages: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """A function-local import and a relative one are found (else the layering test could not fail)."""
    fake = tmp_path / "falqon_dist"
    (fake / "method").mkdir(parents=True)
    (fake / "method" / "__init__.py").write_text("from .convert import x\n")
    (fake / "method" / "convert.py").write_text(
        "def f():\n    from falqon_dist.export import export_fp8\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert imports_of(fake / "method" / "convert.py") == [(2, "falqon_dist.export")]
    assert imports_of(fake / "method" / "__init__.py") == [(1, "falqon_dist.method.convert")]
    assert unit_edges() == {
        ("method", "export"): ["falqon_dist/method/convert.py:2 → falqon_dist.export"]
    }
