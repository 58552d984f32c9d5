"""The package's import graph has no cycle, counting the imports made inside functions (the ones that
usually close a cycle unseen): every module can be read, tested and moved with what is below it.

The graph is read from the source (ast), not from sys.modules: `from . import x` names the submodule x
(the package itself is its parent, imported first anyway), and imports under `if TYPE_CHECKING:` are
annotations only. A second check: no module reads another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lokr_diffusers"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports, anywhere in its source}."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                found = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))
    return out


def test_the_checker_finds_a_cycle_closed_inside_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "lokr_diffusers.state_dict" in graph["lokr_diffusers.model"]  # imported inside a method


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, f"import cycles (imports inside functions count): {found}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_floors_hold() -> None:
    """The key layouts sit below the layers and the model (they know an adapted module by a protocol,
    lokr_diffusers/adaptable.py); the writers sit below the pipeline methods."""
    graph = import_graph()
    for module in graph:
        below = _reachable(graph, module)
        if module.startswith("lokr_diffusers.formats"):
            assert not {m for m in below if m == "lokr_diffusers.model" or m.startswith("lokr_diffusers.layers")}, \
                (module, below)
        if module.startswith("lokr_diffusers.export"):
            assert "lokr_diffusers.loader" not in below, module


# Private names of other libraries the package has to use (torch's module internals, diffusers' pipeline
# helpers and its merged-adapter set, bitsandbytes' CPU unpacking): the only `x._name` reads allowed.
FOREIGN_PRIVATE = frozenset({
    "_parameters", "_modules", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_version", "_conv_forward",
    "_has_compatible_shallow_copy_type", "_merged_adapters", "_pack_latents", "_prepare_latent_image_ids",
    "_unpack_latents", "_convert_weight_packed_for_cpu_inverse",
})


def private_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every `x._name` not on self / cls / super(), and every `from .m import _name`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            out.append((node.lineno, node.attr))
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_the_private_read_checker_sees_attributes_and_imports() -> None:
    tree = ast.parse("from .reuse import _budget\nlayer._kept = None\nself._ok = 1\nsuper()._apply(fn)\n")
    assert private_reads(tree) == [(1, "_budget"), (2, "_kept")]


def test_no_module_reads_another_modules_private_names() -> None:
    found = [f"{name}:{line} {attr}" for name, path in _modules().items()
             for line, attr in private_reads(ast.parse(path.read_text(encoding="utf-8")))
             if attr not in FOREIGN_PRIVATE]
    assert not found, f"private names read across modules: {found}"
