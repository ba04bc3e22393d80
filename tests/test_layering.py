"""The layering of DESIGN.md, read from the source with `ast` (imports inside functions included).

- tables < hooks < sharding < cluster < tracer < serve: a module imports only from its own
  subsystem and the ones below it. The one exception is the command line (shardlens.tracer.cli),
  which fronts every subsystem: its `shardlens serve` and `shardlens token` commands call the
  service's. `shardlens.errors`, `shardlens.progress` and `shardlens.version` are leaves (they
  import nothing of shardlens) that every subsystem may import. Only the package root imports everything; no
  subsystem imports the root, since that is upward.
- Below cluster (tables, hooks, sharding and the leaves) nothing imports Ray.
- A private name (`_x`) is not used across subsystems: not imported from another subsystem's
  module, and not read as an attribute (`stage._pending`) unless the importer's own subsystem
  defines that name. Private attributes that no shardlens module defines (torch's
  `module._forward_hooks`) belong to other libraries, not to a subsystem, and are not reported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardlens"
LAYERS = ("tables", "hooks", "sharding", "cluster", "tracer", "serve")  # each may import the ones before it
LEAVES = ("errors", "progress", "version")
COMMAND_LINE = "shardlens.tracer.cli"
BELOW_RAY = ("tables", "hooks", "sharding", *LEAVES)


@dataclass(frozen=True)
class Source:
    """One module of the package: its dotted name and syntax tree."""

    name: str  # "shardlens.hooks.model"; a package's __init__ has the package's name
    tree: ast.Module
    is_package: bool = False

    @property
    def subsystem(self) -> Optional[str]:
        """'hooks' for shardlens.hooks.model, 'errors' for shardlens.errors, None for the root."""
        return subsystem_of(self.name)


def subsystem_of(module: str) -> Optional[str]:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def read(name: str, text: str, *, is_package: bool = False) -> Source:
    return Source(name, ast.parse(text), is_package)


def package_sources() -> list[Source]:
    sources = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources.append(read(name, path.read_text(), is_package=is_package))
    return sources


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_shardlens(module: str) -> bool:
    return module == "shardlens" or module.startswith("shardlens.")


def walk(tree: ast.AST) -> list[ast.AST]:
    """Every statement and expression of `tree`, in source order."""
    return sorted((node for node in ast.walk(tree) if hasattr(node, "lineno")), key=lambda node: (node.lineno, node.col_offset))


def imports(source: Source) -> Iterator[tuple[ast.stmt, str, list[str]]]:
    """Every import statement as (node, absolute module, imported names); relative ones resolved."""
    for node in walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = source.name.split(".")
                package = package if source.is_package else package[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{module}" if module else base
            yield node, module, [alias.name for alias in node.names]


def where(source: Source, node: ast.AST, note: str = "") -> str:
    return f"{source.name}:{node.lineno}: {ast.unparse(node)}" + (f"  ({note})" if note else "")


RANK = {layer: rank for rank, layer in enumerate(LAYERS)}


def may_import(importer: str, target: Optional[str]) -> bool:
    """Whether a module of subsystem `importer` may import from subsystem `target` (None: the root)."""
    if target is None or importer in LEAVES:
        return importer == target
    if importer == target or target in LEAVES:
        return True
    return importer in RANK and target in RANK and RANK[target] <= RANK[importer]


def upward_imports(source: Source) -> list[str]:
    if source.subsystem is None:  # the package root lists every public name
        return []
    return [
        where(source, node)
        for node, module, _ in imports(source)
        if is_shardlens(module) and not may_import(source.subsystem, subsystem_of(module))
        and not (source.name == COMMAND_LINE and subsystem_of(module) == "serve")
    ]


def ray_imports(source: Source) -> list[str]:
    if source.subsystem not in BELOW_RAY:
        return []
    return [where(source, node) for node, module, _ in imports(source) if module.split(".")[0] == "ray"]


def private_imports(source: Source) -> list[str]:
    if source.subsystem is None:
        return []
    return [
        where(source, node)
        for node, module, names in imports(source)
        if is_shardlens(module)
        and subsystem_of(module) != source.subsystem
        and any(is_private(part) for part in [*module.split("."), *names])
    ]


def defined_names(sources: Iterable[Source]) -> dict[Optional[str], set[str]]:
    """Per subsystem, the names its modules define: functions, classes, methods, assigned
    variables and `self._x = ...` / `cls._x = ...` attributes."""
    defined: dict[Optional[str], set[str]] = {}
    for source in sources:
        names = defined.setdefault(source.subsystem, set())
        for node in ast.walk(source.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and owner_is_self(node):
                names.add(node.attr)
    return defined


def owner_is_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def private_attributes(source: Source, defined: dict[Optional[str], set[str]]) -> list[str]:
    if source.subsystem is None:
        return []
    found = []
    for node in walk(source.tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr) or node.attr in defined[source.subsystem]:
            continue
        owners = sorted(str(sub) for sub, names in defined.items() if node.attr in names)
        if owners:
            found.append(where(source, node, f"{node.attr} is defined in {', '.join(owners)}"))
    return list(dict.fromkeys(found))  # one line per access, also where a line reads it twice


SOURCES = package_sources()
DEFINED = defined_names(SOURCES)
by_name = pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.name)


def report(found: list[str]) -> str:
    return "\n".join(found)


def test_every_module_is_in_a_layer():
    assert len(SOURCES) > 40 and "shardlens.hooks.model" in {source.name for source in SOURCES}
    assert {source.subsystem for source in SOURCES} - {None} <= set(LAYERS) | set(LEAVES)


@by_name
def test_no_upward_imports(source):
    found = upward_imports(source)
    assert not found, report(found)


@by_name
def test_no_ray_below_cluster(source):
    found = ray_imports(source)
    assert not found, report(found)


@by_name
def test_no_private_imports_across_subsystems(source):
    found = private_imports(source)
    assert not found, report(found)


@by_name
def test_no_private_attributes_across_subsystems(source):
    found = private_attributes(source, DEFINED)
    assert not found, report(found)


MAX_POSITIONAL = 6
# Signatures others dictate: TransformerLens' check_and_add_hook, transformers' attention
# interface and FalconAttention.forward.
DICTATED = {"check_and_add_hook", "shardlens_attention", "falcon_attention"}


def long_signatures(source: Source) -> list[str]:
    """Functions taking more than MAX_POSITIONAL positional parameters (besides self / cls):
    what they take past that should be keyword-only, or a value."""
    found = []
    for node in walk(source.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in DICTATED:
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                found.append(f"{source.name}:{node.lineno}: {node.name} takes {len(positional)} positional parameters")
    return found


@by_name
def test_no_function_takes_more_than_six_positional_parameters(source):
    found = long_signatures(source)
    assert not found, report(found)


# The checkers themselves, on synthetic modules: each finds its violation and passes clean code.


def test_long_signatures_are_found():
    source = read(
        "shardlens.hooks.fake",
        "def run(a, b, c, d, e, f, g):\n    pass\n"
        "def fine(self, a, b, c, d, e, f, *, g):\n    pass\n",
    )
    assert long_signatures(source) == ["shardlens.hooks.fake:1: run takes 7 positional parameters"]


def test_upward_imports_are_found():
    source = read(
        "shardlens.tables.fake",
        "import os\n"
        "from shardlens.errors import ShardPlanError\n"
        "from shardlens.version import __version__\n"
        "from shardlens.tables.cache import ActivationCache\n"
        "def f():\n"
        "    from shardlens.hooks.model import HookedModel\n"
        "    import shardlens\n"
        "    from shardlens import __version__\n"
        "    from ..tracer import cli\n",
    )
    assert upward_imports(source) == [
        "shardlens.tables.fake:6: from shardlens.hooks.model import HookedModel",
        "shardlens.tables.fake:7: import shardlens",
        "shardlens.tables.fake:8: from shardlens import __version__",
        "shardlens.tables.fake:9: from ..tracer import cli",
    ]


def test_downward_imports_pass():
    source = read(
        "shardlens.tracer.fake",
        "from shardlens.cluster.coordinator import Coordinator\nfrom shardlens.tables import read_cache\nfrom . import cells\n",
    )
    root = read("shardlens", "from shardlens.tracer import Tracer\n", is_package=True)
    assert upward_imports(source) == [] and upward_imports(root) == []


def test_leaves_import_nothing_of_shardlens():
    source = read("shardlens.errors", "from shardlens.tables.cache import ActivationCache\n")
    assert upward_imports(source) == ["shardlens.errors:1: from shardlens.tables.cache import ActivationCache"]


def test_ray_imports_are_found():
    text = "def f():\n    import ray\n    from ray.util import placement_group\n"
    assert ray_imports(read("shardlens.sharding.fake", text)) == [
        "shardlens.sharding.fake:2: import ray",
        "shardlens.sharding.fake:3: from ray.util import placement_group",
    ]
    assert ray_imports(read("shardlens.errors", text)) != []
    assert ray_imports(read("shardlens.cluster.fake", text)) == []


def test_private_imports_are_found():
    text = "from shardlens.hooks.model import _load_tokenizer, HookedModel\n"
    assert private_imports(read("shardlens.tracer.fake", text)) == [
        "shardlens.tracer.fake:1: from shardlens.hooks.model import _load_tokenizer, HookedModel"
    ]
    assert private_imports(read("shardlens.hooks.fake", text)) == []


def test_private_attributes_are_found():
    owner = read(
        "shardlens.sharding.fake_stage",
        "class Stage:\n"
        "    def __init__(self):\n"
        "        self._pending = None\n"
        "    def _install_spec(self, spec):\n"
        "        self._pending = spec\n",
    )
    user = read(
        "shardlens.cluster.fake_worker",
        "def run(stage, tensor):\n"
        "    stage._install_spec(None)\n"
        "    return stage._pending, tensor._version, stage.__dict__\n",
    )
    defined = defined_names([owner, user])
    assert private_attributes(user, defined) == [
        "shardlens.cluster.fake_worker:2: stage._install_spec  (_install_spec is defined in sharding)",
        "shardlens.cluster.fake_worker:3: stage._pending  (_pending is defined in sharding)",
    ]
    assert private_attributes(owner, defined) == []
