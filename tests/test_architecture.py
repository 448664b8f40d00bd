"""labkit's import graph, read from the source with `ast` (every import statement, also those inside
functions): pruning does not need distillation, the kernels use labkit.quant only through its 4-bit
layout, and no module or package imports itself back through others. Each rule is also run on a small
hand-made graph that breaks it, so a rule that could never fail would show here. Last, the README's
lesson -> module map names exactly the modules the package has."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from labkit.course import LESSON_ID, lesson_id, lessons

LABKIT = Path(__file__).resolve().parent.parent / "labkit"
W4_LAYOUT = "labkit.quant.qlinear"  # QuantLinear: the one module of labkit.quant that labkit.kernels uses


def module_name(path: Path) -> str:
    parts = path.relative_to(LABKIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The labkit modules that the import statements of `source` name, at any depth (module level,
    inside functions and classes). `from pkg import name` names pkg.name when that is a module."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: one dot is the current package, each further dot one package up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(name for name in names if name == "labkit" or name.startswith("labkit."))
    return found - {module}


def labkit_graph() -> dict[str, set[str]]:
    """{module: the labkit modules it imports} for every .py file of labkit."""
    files = {module_name(path): path for path in sorted(LABKIT.rglob("*.py"))}
    known = set(files)
    return {
        name: imported_modules(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


GRAPH = labkit_graph()


def with_parent_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing labkit.quant.formats runs labkit/quant/__init__.py first: add those implicit edges."""
    expanded = {}
    for module, targets in graph.items():
        implicit = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        expanded[module] = (targets | implicit) - {module}
    return expanded


def find_path(graph: dict[str, set[str]], sources, targets) -> list[str] | None:
    """A chain of imports from a module in `sources` to one in `targets`, or None (breadth first)."""
    targets = set(targets)
    came_from = {s: None for s in sources}
    queue = list(came_from)
    while queue:
        node = queue.pop(0)
        if node in targets:
            path = [node]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of `graph` (node -> the nodes it imports), or None."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node):
        on_path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*on_path[on_path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def unit(module: str) -> str:
    """The package or top-level module a module belongs to: labkit.quant.gptq -> labkit.quant."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return units


def in_package(package: str):
    return {m for m in GRAPH if m == package or m.startswith(package + ".")}


def quant_imports_of_kernels(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{kernels module: the labkit.quant modules it imports other than the 4-bit layout}."""
    found = {}
    for module, targets in graph.items():
        if module == "labkit.kernels" or module.startswith("labkit.kernels."):
            other = {t for t in targets if (t == "labkit.quant" or t.startswith("labkit.quant.")) and t != W4_LAYOUT}
            if other:
                found[module] = other
    return found


# --- the rules on labkit ----------------------------------------------------------------------------


def test_every_import_resolves_to_a_labkit_module():
    unknown = {m: sorted(t - set(GRAPH)) for m, t in GRAPH.items() if t - set(GRAPH)}
    assert not unknown, f"imports of labkit modules that do not exist: {unknown}"
    assert len(GRAPH) > 50 and GRAPH["labkit.prune.llm_pruner"] >= {"labkit.models", "labkit.walk"}


def test_prune_does_not_import_distill():
    path = find_path(with_parent_packages(GRAPH), in_package("labkit.prune"), in_package("labkit.distill"))
    assert path is None, "labkit.prune reaches labkit.distill: " + " -> ".join(path)


def test_kernels_use_quant_only_through_the_4bit_layout():
    assert W4_LAYOUT in GRAPH
    assert not quant_imports_of_kernels(GRAPH), (
        f"labkit.kernels may import labkit.quant only through {W4_LAYOUT}; also found: "
        f"{quant_imports_of_kernels(GRAPH)}"
    )


def test_no_import_cycle_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    """labkit.prune, labkit.quant, labkit.walk, ...: each layer uses only the ones below it."""
    cycle = find_cycle(unit_graph(GRAPH))
    assert cycle is None, "import cycle between labkit's packages: " + " -> ".join(cycle)


# --- the rules can fail -----------------------------------------------------------------------------


def test_imports_inside_functions_and_relative_imports_are_seen():
    known = {"labkit.distill", "labkit.distill.trainer", "labkit.quant", "labkit.quant.formats", "labkit.models"}
    source = (
        "from ..models import check_llama\n"
        "import torch\n"
        "def recover():\n"
        "    from ..distill import finetune\n"
        "    from ..quant.formats import quantize\n"
        "    from .. import distill\n"
    )
    found = imported_modules(source, "labkit.prune.llm_pruner", False, known)
    assert found == {"labkit.models", "labkit.distill", "labkit.quant.formats"}
    assert imported_modules("from . import trainer", "labkit.distill", True, known) == {"labkit.distill.trainer"}


def test_the_rules_catch_a_hand_made_violation():
    graph = {
        "labkit.prune.wanda": {"labkit.walk"},
        "labkit.walk": {"labkit.lora"},
        "labkit.lora": {"labkit.distill.trainer"},
        "labkit.kernels.llama": {"labkit.quant.formats", W4_LAYOUT},
    }
    assert find_path(with_parent_packages(graph), ["labkit.prune.wanda"], ["labkit.distill", "x"]) == [
        "labkit.prune.wanda",
        "labkit.walk",
        "labkit.lora",
        "labkit.distill",  # implicit: labkit/distill/__init__.py runs before labkit.distill.trainer
    ]
    assert quant_imports_of_kernels(graph) == {"labkit.kernels.llama": {"labkit.quant.formats"}}


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"d": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is not a cycle
    graph = {"labkit.prune.llm_pruner": {"labkit.distill.trainer"}, "labkit.distill.trainer": {"labkit.prune.masks"}}
    assert find_cycle(graph) is None and find_cycle(unit_graph(graph)) == [
        "labkit.distill",
        "labkit.prune",
        "labkit.distill",
    ]


@pytest.mark.parametrize("package", ["labkit.prune", "labkit.distill", "labkit.kernels", "labkit.quant"])
def test_packages_are_found(package):
    assert package in GRAPH and len(in_package(package)) > 2


# --- the README's lesson -> module map --------------------------------------------------------------

NOT_IN_THE_MAP = {
    "course.py",  # the runner of the lessons (python -m labkit.course), not a technique
    "threads.py",  # the caller's thread-count context (labkit.threads.num_threads), used by several tracks
    # the GPU profile's memory rehearsed on CPU (README "Two profiles"): the harness and each lesson's plan
    "rehearsal/harness.py",
    "rehearsal/plans.py",
    "rehearsal/compression.py",
    "rehearsal/serving_and_training.py",
}


def lesson_map(readme: str) -> dict[str, set[str]]:
    """{lesson: module paths under labkit/} from the README's table rows `| NN | modules |` (or `| NNx | ...`), where
    `dir/` (`a.py`, `b.py`) names dir/a.py and dir/b.py, and any other `x.py` or `dir/x.py` itself."""
    lessons = {}
    for lesson, cell in re.findall(rf"^\s*\| ({LESSON_ID}) \| ([^|]+) \|\s*$", readme, re.M):
        paths = set()
        for folder, inside in re.findall(r"`(\w+)/` \(([^)]*)\)", cell):
            paths.update(f"{folder}/{name}" for name in re.findall(r"`([\w.]+\.py)`", inside))
        rest = re.sub(r"`(\w+)/` \(([^)]*)\)", "", cell)
        paths.update(re.findall(r"`([\w/]+\.py)`", rest))
        lessons[lesson] = paths
    return lessons


def test_readme_lesson_map_matches_the_package():
    mapped = lesson_map((LABKIT.parent / "README.md").read_text())
    ids = [lesson_id(p) for p in lessons()]
    assert sorted(mapped) == ids, f"the map should have one row per lesson, {ids}; has {sorted(mapped)}"
    named = set().union(*mapped.values())
    modules = {
        str(path.relative_to(LABKIT))
        for path in LABKIT.rglob("*.py")
        if not path.name.startswith("_") and path.parts[-2] not in ("check", "solutions")
    } - NOT_IN_THE_MAP
    assert not named - modules, f"the README's map names modules that do not exist: {sorted(named - modules)}"
    assert not modules - named, f"modules missing from the README's lesson map: {sorted(modules - named)}"


def test_lesson_map_parser():
    readme = (
        "| 01 | `00_baseline` | not the map |\n"
        "  | 07 | `distill/` (`losses.py`, `trainer.py`), `prune/depth.py` (ShortGPT, `drop_layers`), `lora.py` |\n"
    )
    assert lesson_map(readme) == {"07": {"distill/losses.py", "distill/trainer.py", "prune/depth.py", "lora.py"}}
