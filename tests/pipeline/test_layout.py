"""The layout of pipeline/: a folder per stage, imports one way (jobs -> pipeline -> hipie and
schemas), no import cycle between modules nor between stages.

Read from the sources with ``ast``; nothing is imported. Imports inside functions count as much as
those at the top of a module (they run too, only later), and importing ``a.b.c`` counts as
importing the packages ``a`` and ``a.b`` as well (Python runs their ``__init__`` first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipeline"
STAGES = ("sources", "masks", "labeling", "review", "export", "finetune")
SHARED = ("pipeline.storage", "pipeline.vocabulary")  # used by several stages, at the top
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name ``path`` imports, anywhere in the file: ``import a.b`` gives ``a.b``,
    ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (c may be a module or a name in a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def pipeline_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PIPELINE.rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports (with their parent packages), itself excluded."""

    def resolve(name: str) -> str | None:  # the longest prefix of ``name`` that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(path):
            target = resolve(name)
            while target:  # the module and every package above it
                edges.add(target)
                target = target.rpartition(".")[0]
        graph[module] = {t for t in edges if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None (iterative depth-first search)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path.pop())
            elif nxt in path:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def stage_of(module: str) -> str:
    """``pipeline.<stage>`` for a module of a stage folder, else the (top-level) module itself."""
    return ".".join(module.split(".")[:2])


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    stages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        a = stage_of(module)
        stages.setdefault(a, set())
        for target in targets:
            b = stage_of(target)
            if b not in (a, "pipeline"):  # everything sits in the root package
                stages[a].add(b)
    return stages


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(pipeline_modules())


def test_the_checker_sees_the_real_graph(graph):
    assert len(graph) > 15
    assert sum(len(t) for t in graph.values()) > 40
    assert {f"pipeline.{s}" for s in STAGES} | set(SHARED) <= set(graph)
    # top-level, from-import of a module, and inside a function (the labeler is imported lazily)
    assert "pipeline.labeling.transform" in graph["pipeline.labeling.job"]
    assert "pipeline.labeling.sinks" in graph["pipeline.labeling.parts"]
    assert "pipeline.labeling.labeler" in graph["pipeline.labeling.transform"]
    assert "pipeline.review.app" in graph["pipeline.review.ingest"]
    assert "pipeline.labeling" in graph["pipeline.labeling.job"]  # the package above, too


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    modules = pipeline_modules()
    assert find_cycle(import_graph(modules)) is None
    looped = import_graph(modules)
    looped["pipeline.labeling.transform"].add("pipeline.labeling.job")  # as it was before
    assert find_cycle(looped) is not None


def test_every_stage_is_a_package_with_a_docstring_and_nothing_else(graph):
    for stage in STAGES:
        init = PIPELINE / stage / "__init__.py"
        assert init.is_file(), f"missing {init.relative_to(REPO)}"
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc) > 80, f"{stage}/__init__.py: say what the stage does"
        assert len(tree.body) == 1, f"{stage}/__init__.py: a docstring only (no re-exports)"
        modules = [m for m in graph if m.startswith(f"pipeline.{stage}.")]
        assert modules, f"stage {stage} has no module"
    assert (PIPELINE / "vocabularies" / "synthetic.yaml").is_file()


def test_no_import_cycle_between_pipeline_modules(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_import_cycle_between_stages(graph):
    stages = stage_graph(graph)
    assert len(stages) >= len(STAGES) + len(SHARED)
    assert "pipeline.sources" in stages["pipeline.labeling"]  # stages do depend on stages
    assert find_cycle(stages) is None, f"stage cycle: {' -> '.join(find_cycle(stages))}"


def test_shared_modules_import_no_stage(graph):
    for module in SHARED:
        assert not {stage_of(t) for t in graph[module]} - {"pipeline"}, module


def test_pipeline_never_imports_jobs():
    paths = sorted(PIPELINE.rglob("*.py"))
    assert len(paths) > 15
    for path in paths:
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] == "jobs")
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_hipie_and_schemas_never_import_pipeline_or_jobs():
    paths = sorted((REPO / "hipie").rglob("*.py")) + sorted((REPO / "schemas").rglob("*.py"))
    assert len(paths) > 20
    for path in paths:
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in ("pipeline", "jobs"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_modules_stay_short():
    lengths = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PIPELINE.rglob("*.py")
    }
    assert len(lengths) > 15
    too_long = {k: n for k, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"split these modules (over {MAX_LINES} lines): {too_long}"
