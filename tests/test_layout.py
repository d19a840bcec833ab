"""The repository's layout: none of our module names hides an installed package.

Every process started here has one of our folders first on sys.path (the root for train.py and sample.py,
bench/ or prepare/ for their scripts, tests/ under pytest), so a module of ours named like an installed
package replaces it for every library in that process: our kernels/ did this to Hugging Face's `kernels`,
which transformers imports."""
import ast
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

# Folders that are sys.path[0] for some process we start: scripts run from them, or pytest's test folder.
SCRIPT_FOLDERS = (REPO, REPO / "bench", REPO / "prepare", REPO / "tests")
REQUIREMENT_FILES = (REPO / "requirements.txt", REPO / "tests" / "requirements.txt")
# kernels/ is the project's published layout and keeps its name. It clashes with Hugging Face's `kernels`,
# which only transformers needs: transformers runs in its own process without our folders on sys.path (the
# interop tests do so, and the README tells users who import our code to do the same).
KNOWN_CLASHES = {"kernels"}


def normalized(name: str) -> str:
    """PEP 503's form of a distribution name, applied to module names too: 'Select_Impl' -> 'select-impl'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def our_top_level_modules() -> dict[str, Path]:
    """What `import NAME` finds in our folders: NAME.py, or a folder holding __init__.py. (A folder without
    one is a namespace package, which any installed module or package of that name takes precedence over.)"""
    modules = {}
    for folder in SCRIPT_FOLDERS:
        for path in folder.iterdir():
            if path.suffix == ".py" or (path / "__init__.py").is_file():
                modules[normalized(path.stem)] = path.relative_to(REPO)
    return modules


def required_distributions() -> set[str]:
    names = set()
    for file in REQUIREMENT_FILES:
        for line in file.read_text().splitlines():
            requirement = line.split("#")[0].strip()
            if requirement:
                names.add(normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group()))
    return names


def installed_names() -> set[str]:
    """The import names of every installed distribution, and the distributions' own names."""
    names = {normalized(module) for module in importlib.metadata.packages_distributions()}
    names |= {normalized(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
    return names


def test_the_name_reader_sees_what_it_should():
    modules = our_top_level_modules()
    assert {"model", "train", "sample", "kernels", "prepare", "bench"} <= set(modules)
    assert modules["common"] in (Path("bench/common.py"), Path("prepare/common.py"))
    assert "config" not in modules and "docs" not in modules  # no __init__.py: namespace packages
    assert {"torch", "numpy", "tiktoken", "transformers"} <= required_distributions()
    assert {"torch", "numpy", "pytest"} <= installed_names()


def test_no_module_of_ours_hides_an_installed_or_required_package():
    modules = our_top_level_modules()
    clashes = set(modules) & (installed_names() | required_distributions())
    unexpected = sorted(clashes - KNOWN_CLASHES)
    assert not unexpected, (
        "modules of ours named like installed or required packages (rename them, or move them into the "
        f"library package): {', '.join(f'{name} ({modules[name]})' for name in unexpected)}"
    )
    assert KNOWN_CLASHES <= set(modules), "a known clash is gone: drop it from KNOWN_CLASHES"


# -----------------------------------------------------------------------------
# Imports point one way: programs -> library -> kernels, and never in a circle

# What each module is: the programs run as scripts; the library is model.py and the tritongpt package.
LAYERS = {"kernels": 0, "library": 1, "program": 2}
PUBLISHED = {"README.md", "model.py", "train.py", "sample.py", "prepare", "kernels", "config", "bench", "tests"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def layer(module: str) -> int:
    if module.startswith("kernels"):
        return LAYERS["kernels"]
    if module == "model" or module.startswith("tritongpt"):
        return LAYERS["library"]
    return LAYERS["program"]


def our_modules() -> dict[str, Path]:
    paths = [REPO / "model.py", REPO / "train.py", REPO / "sample.py"]
    for folder in ("tritongpt", "kernels", "bench", "prepare"):
        paths += sorted((REPO / folder).glob("*.py"))
    return {module_name(path): path for path in paths}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that `path` imports anywhere, functions included; not those under
    `if TYPE_CHECKING:`, which only a type checker runs."""
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_checker_finds_cycles_and_reads_function_level_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    (tmp_path / "m.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import model\n"
                                   "def f():\n    from tritongpt import hub\n    import kernels.common\n")
    assert imports_of(tmp_path / "m.py", {"model", "tritongpt.hub", "kernels.common", "kernels"}) == {
        "tritongpt.hub", "kernels.common"}


def test_the_top_level_is_the_published_layout_and_one_package():
    """What git tracks at the top: the published layout, the one library package, docs and the requirements."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: no list of tracked files to compare")
    top = {name.split("/")[0] for name in tracked if not name.startswith(".")}
    assert top == PUBLISHED | {"tritongpt", "docs", "requirements.txt"}


def test_imports_point_one_way_and_never_in_a_circle():
    graph = import_graph()
    assert not cycles(graph), f"import cycles: {cycles(graph)}"
    upward = sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                    if layer(target) > layer(source))
    assert not upward, "upward imports: " + "; ".join(upward)
    assert not any(graph[name] - {m for m in graph if m.startswith("kernels")} for name in graph
                   if name.startswith("kernels")), "kernels/ imports nothing of the project"
