"""The package's one boundary, checked on its source: the LLM half (pipeline/llm, embed_passes) writes the feature
table (feature_table.py), stage two (pipeline/stage_two) reads it and imports no torch; stages import no other
stage (but `all`); only dist.py reads the rank environment."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


KNOWN = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module `path` imports, at any depth of its code (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pipeline import artifacts` imports the module artifacts; `from pipeline.data import X`, data.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & KNOWN
            found |= submodules or {node.module}
    return found & KNOWN


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def in_part(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


@pytest.mark.parametrize("name", [n for n in MODULES if in_part(n, "pipeline.stage_two") or
                                  n == "pipeline.feature_table"])
def test_stage_two_and_the_feature_table_never_import_the_llm_half(name):
    """Stage two reads the feature table only: no module of pipeline/llm, embed_passes or a stage."""
    upward = [m for m in imported_modules(MODULES[name])
              if in_part(m, "pipeline.llm") or in_part(m, "pipeline.stages") or m == "pipeline.embed_passes"
              or m == "pipeline.predictor"]
    assert upward == []


@pytest.mark.parametrize("name", [n for n in MODULES if in_part(n, "pipeline.llm")])
def test_the_llm_half_never_imports_stage_two_or_a_stage(name):
    bad = [m for m in imported_modules(MODULES[name])
           if in_part(m, "pipeline.stage_two") or in_part(m, "pipeline.stages") or m == "pipeline.embed_passes"]
    assert bad == []


@pytest.mark.parametrize("name", [n for n in MODULES if in_part(n, "pipeline.stages") and n != "pipeline.stages.all"
                                  and n != "pipeline.stages"])
def test_no_stage_imports_another(name):
    others = [m for m in imported_modules(MODULES[name]) if in_part(m, "pipeline.stages") and m != name
              and m != "pipeline.stages"]
    assert others == []


def test_stage_two_imports_neither_torch_nor_transformers():
    """Importing every stage-two module and the feature table (in a fresh interpreter) loads no torch."""
    names = [n for n in MODULES if in_part(n, "pipeline.stage_two") or n == "pipeline.feature_table"]
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + \
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_dist_reads_the_rank_environment():
    readers = [name for name, path in MODULES.items() if name != "pipeline.dist"
               and any(word in path.read_text() for word in ('"RANK"', '"WORLD_SIZE"', '"LOCAL_RANK"'))]
    assert readers == []


def test_the_import_graph_has_no_cycle():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in graph.get(name, ()):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*trail, name, target]))
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
