"""The repository's layout: none of our module names hides an installed package.

Every process started here has one of our folders first on sys.path (the root for train.py and sample.py,
bench/ or prepare/ for their scripts, tests/ under pytest), so a module of ours named like an installed
package replaces it for every library in that process: our kernels/ did this to Hugging Face's `kernels`,
which transformers imports."""
import importlib.metadata
import re
from pathlib import Path

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
