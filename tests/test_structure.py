"""The project's shape, derived from the code: import layers, no cycles, and ``dvc.yaml`` deps and params exact.

The import graph is static (every ``import`` in every function, read with ``ast``), not ``sys.modules`` after
an import, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bne", "tasks", "flows")
#: What each layer may import from the project (bne: nothing above it; flows: tasks and bne).
ALLOWED = {"bne": {"bne"}, "tasks": {"bne", "tasks"}, "flows": {"bne", "tasks", "flows"}}
#: Third-party packages the science library must never import.
FORBIDDEN_IN_BNE = {"yaml", "typer", "prefect", "dvc", "great_expectations", "optuna", "ruamel", "pydantic", "rich"}
STAGES = ("ingest", "validate", "cache", "train", "stats", "embed", "tune", "evaluate", "final", "extend", "report")


def module_files() -> dict[str, Path]:
    """``bne.norm.dsbn`` -> its file, for every module of the three packages (``__init__`` as the package name)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party names) that ``path`` imports anywhere in its body."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    project, external = set(), set()

    def add(mod: str) -> None:
        top = mod.split(".")[0]
        if top not in PACKAGES:
            external.add(top)
            return
        while mod and mod not in modules:  # `from bne.x import name`: name is not a module
            mod = mod.rpartition(".")[0]
        if mod:
            project.add(mod)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                full = f"{base}.{a.name}"
                add(full if full in modules else base)
    project.discard(name)
    return project, external


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], dict[str, set[str]], dict[str, set[str]]]:
    modules = module_files()
    edges, external = {}, {}
    for mod, path in modules.items():
        edges[mod], external[mod] = imports_of(path, modules)
    return modules, edges, external


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    return seen


def test_each_layer_imports_only_downward(graph):
    _, edges, external = graph
    bad = [(m, d) for m, ds in edges.items() for d in ds if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, f"upward imports: {bad}"
    science = {m: sorted(external[m] & FORBIDDEN_IN_BNE) for m in edges if m.startswith("bne")}
    assert not {m: e for m, e in science.items() if e}, "the library imports orchestration"


def test_no_import_cycle(graph):
    _, edges, _ = graph
    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in closure(b, edges)})
    assert not cycles, f"modules that reach each other: {cycles}"


def test_layer_check_sees_imports_inside_functions(tmp_path):
    f = ROOT / "bne" / "_probe_for_test.py"
    f.write_text("def f():\n    import optuna\n    from tasks import params\n")
    try:
        project, external = imports_of(f, {**module_files(), "bne._probe_for_test": f})
    finally:
        f.unlink()
    assert "optuna" in external and "tasks.params" in project


def test_every_stage_is_a_task_module():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)
    for s in STAGES:
        mod = importlib.import_module(f"tasks.{s}")
        assert hasattr(mod, "PARAMS") and callable(mod.run), s


def expected_deps(stage: str, graph) -> set[str]:
    """The stage's task module and every project module it reaches, as files (package __init__s included)."""
    modules, edges, _ = graph
    files = {modules[m] for m in closure(f"tasks.{stage}", edges)}
    # importing bne.norm.dsbn runs bne/norm/__init__.py: the package's own code is a dependency too
    for f in list(files):
        for parent in f.relative_to(ROOT).parents[:-1]:
            init = ROOT / parent / "__init__.py"
            if init.is_file() and init.stat().st_size:
                files.add(init)
    return {str(f.relative_to(ROOT)) for f in files if not (f.name == "__init__.py" and f.stat().st_size == 0)}


def declared_code_deps(body: dict) -> set[str]:
    out = set()
    for d in body.get("deps", []):
        d = d if isinstance(d, str) else next(iter(d))
        if d.startswith(PACKAGES):
            p = ROOT / d
            out |= {str(f.relative_to(ROOT)) for f in p.rglob("*.py")} if p.is_dir() else {d}
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_deps_are_the_code_the_stage_runs(stage, graph):
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    body = body.get("do", body)
    assert declared_code_deps(body) == expected_deps(stage, graph)
    listed = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
    assert len(listed) == len(set(listed)), f"{stage}: a dep listed twice"


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_params_are_the_keys_the_stage_declares(stage):
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    body = body.get("do", body)
    declared = importlib.import_module(f"tasks.{stage}").PARAMS
    assert sorted(body.get("params", [])) == sorted(declared)
    assert f"bne {stage}" in body["cmd"] or "bne stats extract" in body["cmd"]
