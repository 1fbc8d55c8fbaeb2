"""The package's shape stays what the README's "Where things are" describes: modules of a readable
size, no import cycle between modules, no benchmark plumbing in the installed package, and no lab
history in code comments."""
import ast
import os
import re

import twicediff

PACKAGE = os.path.dirname(os.path.abspath(twicediff.__file__))
MAX_LINES = 450


def _modules():
    """{dotted name: path} of every Python module of the installed package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _module_level_imports(name, path, known):
    """The package modules ``name`` imports at module level (not inside functions: those run late)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_module_is_too_long():
    long = {name: n for name, path in _modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _module_level_imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is the usual re-export, not a cycle
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_benchmark_plumbing_in_the_package():
    """git, subprocess and /proc are the benchmark scripts' business. Two probes of the machine read
    /proc: the memory budget (free memory) and the GEMM-library probe (the CPU model that keys its
    on-disk cache)."""
    for name, path in _modules().items():
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "subprocess" not in imported, name
        if name not in ("twicediff.memory", "twicediff.torch.engines.probe"):
            assert "/proc/" not in source, name


def test_comments_carry_no_lab_history():
    pattern = re.compile(r"issue [0-9]|model \(a\)")
    for name, path in _modules().items():
        hits = [i + 1 for i, line in enumerate(open(path, encoding="utf-8")) if pattern.search(line)]
        assert not hits, f"{name}: lines {hits}"
