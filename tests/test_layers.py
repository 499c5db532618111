"""The import direction the tree promises, checked on the source: front ends → serving core → model loading.

No import cycle either, anywhere in the project's packages. Read from each
module's AST (imports inside functions included), so a lazy import cannot
hide a dependency the wrong way round. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    )


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO)) for path in paths]


SERVING = sources("bot/serving")
FRONT_ENDS = [*sources("bot/discord_bot"), *sources("bot/api"), REPO / "bot/console.py"]
NOT_IN_SERVING = ("bot.discord_bot", "bot.api", "bot.console", "bot.demo", "discord", "aiohttp.web")
MODEL_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def test_the_layers_are_all_found() -> None:
    assert {"engine.py", "worker.py", "openai_engine.py", "context.py"} <= {p.name for p in SERVING}
    assert len(FRONT_ENDS) >= 10


@pytest.mark.parametrize("path", SERVING, ids=ids(SERVING))
def test_the_serving_core_imports_no_front_end(path: Path) -> None:
    assert offending(path, NOT_IN_SERVING) == []


@pytest.mark.parametrize("path", FRONT_ENDS, ids=ids(FRONT_ENDS))
def test_front_ends_never_touch_the_model_libraries(path: Path) -> None:
    assert offending(path, MODEL_LIBRARIES) == []


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("freeski_common", ("crawl", "finetune", "bot")),
        ("crawl", ("finetune", "bot")),
        ("finetune", ("bot",)),
    ],
)
def test_a_stage_imports_no_later_stage(folder: str, forbidden: tuple[str, ...]) -> None:
    found = {
        name: offending(path, forbidden)
        for path, name in zip(sources(folder), ids(sources(folder)), strict=True)
    }
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_the_checker_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from aiohttp import web\n    import discord.ext\n")
    assert offending(module, NOT_IN_SERVING) == ["aiohttp.web", "discord.ext"]


def readme_map() -> dict[str, str]:
    """The README's "Where things are" block: each path it names and the text beside it."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Where things are", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    parent = current = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        first, _, rest = line.strip().partition(" ")
        if indent in (0, 2) and (first.endswith("/") or first.endswith(".py")):
            if indent == 0:
                parent = first
                current = first
            else:
                current = parent + first
            entries[current] = rest
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_the_readme_map_names_only_what_exists_and_every_package() -> None:
    entries = readme_map()
    missing = [path for path in entries if not (REPO / path).exists()]
    assert missing == []
    for path, text in entries.items():
        named = re.findall(r"\b(\w+\.py)\b", text)
        assert [m for m in named if not (REPO / path / m).exists()] == [], path
    top_level = {
        f"{p.name}/" for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    bot_packages = {f"bot/{p.parent.name}/" for p in (REPO / "bot").glob("*/__init__.py")}
    bot_modules = {f"bot/{p.name}" for p in (REPO / "bot").glob("*.py") if p.stem[0] != "_"}
    assert top_level | bot_packages | bot_modules <= set(entries)


PACKAGES = ("bot", "crawl", "finetune", "freeski_common")


def module_name(path: Path, base: Path = REPO) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, base: Path = REPO) -> set[str]:
    """What ``path`` imports when it runs: every import but those under ``if TYPE_CHECKING:``.

    Relative imports are resolved against the module's package, so ``from . import x``
    is an edge like any other.
    """
    package = module_name(path, base).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for statement in child.orelse:
                    visit_node(statement)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names


def import_graph(roots: tuple[str, ...], base: Path = REPO) -> dict[str, set[str]]:
    """Each project module → the project modules it imports.

    A name imported from a module counts as that module; a submodule does not
    count its package's ``__init__`` (Python runs it first, but it is the
    package's table of contents, not a dependency of the submodule's code).
    """
    paths = {module_name(p, base): p for root in roots for p in sorted((base / root).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for imported in runtime_imports(path, base):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None: a depth-first search for a back edge."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> list[str] | None:
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph[module]):
            if imported in on_stack:
                return [*stack[stack.index(imported) :], imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle is not None:
                    return cycle
        stack.pop()
        on_stack.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle among the project's modules.

    Imports inside functions count: a lazy import postpones a cycle to the
    first call but leaves the two modules owning each other's concerns, which
    is what this test is for (the site registry once hid one that way).
    Imports under ``if TYPE_CHECKING:`` do not: they never run, and an
    annotation naming a type is not a dependency on its module's behaviour.
    """
    graph = import_graph(PACKAGES)
    assert {"crawl.site", "bot.serving.worker", "finetune.train", "freeski_common.cli"} <= set(
        graph
    )
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_sees_lazy_relative_imports_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    (package / "b.py").write_text("from .c import x\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import y\n"
        "else:\n    import pkg.a\n"
    )
    assert find_cycle(import_graph(("pkg",), tmp_path)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    assert find_cycle(import_graph(("pkg",), tmp_path)) is None
