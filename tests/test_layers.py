"""The import direction the tree promises, checked on the source: front ends → serving core → model loading.

Read from each module's AST (imports inside functions included), so a lazy
import cannot hide a dependency the wrong way round. See docs/architecture.md.
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
