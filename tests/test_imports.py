"""Import graph of the lafid package: no cycles, cofe never reaches up into bench, only the Ray executor
(`lafid.ray_executor`) imports ray, modules stay small, and the stage and recipe folders are imported
under the package.

Imports inside functions count too: a deferred import hides a cycle from the
interpreter but not from a reader, and the cycles this guards against all went
through them.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import lafid

ROOT = Path(lafid.__file__).parent
REPO = ROOT.parent
MAX_LINES = 400


def module_names(root: Path = ROOT) -> dict:
    """Map every lafid module name to its source file."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    """Absolute name of a (possibly relative) `from ... import` base."""
    if not level:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, current: str, known: set, is_package: bool = False) -> set:
    """lafid modules that `source` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, current, is_package)
            # `from lafid.x import y` names the submodule lafid.x.y when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in targets:
            # `import lafid.a.b` depends on the deepest known module in the dotted name.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != current:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict:
    names = module_names(root)
    known = set(names)
    return {
        name: imports_of(path.read_text(), name, known, path.name == "__init__.py")
        for name, path in names.items()
    }


def imports_ray(source: str) -> bool:
    """`source` imports ray or one of its modules, anywhere (module level or inside functions)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name == "ray" or name.startswith("ray.") for name in names):
            return True
    return False


def find_cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), as sorted lists."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports(graph: dict, lower: str = "lafid.cofe", upper: str = "lafid.bench") -> list:
    def inside(name, pkg):
        return name == pkg or name.startswith(pkg + ".")

    return sorted(
        (src, dst)
        for src, dsts in graph.items()
        if inside(src, lower)
        for dst in dsts
        if inside(dst, upper)
    )


def test_lafid_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30, sorted(graph)  # the walk really saw the package
    assert find_cycles(graph) == []


def test_cofe_does_not_import_bench():
    assert upward_imports(import_graph()) == []


def test_only_the_ray_executor_imports_ray():
    """lafid modules and the stages beside them (which must never import ray) outside `lafid.ray_executor`."""
    sources = {name: path for name, path in module_names().items() if not name.startswith("lafid.ray_executor")}
    sources.update({f"lafid.stages.{p.stem}": p for p in (REPO / "stages").glob("*.py")})
    assert "lafid.runner" in sources and "lafid.stages.speech_disambiguation" in sources  # the walk saw both trees
    assert sorted(name for name, path in sources.items() if imports_ray(path.read_text())) == []
    executor = [path for name, path in module_names().items() if name.startswith("lafid.ray_executor.")]
    # control: the executor does (all but `actor`, the actor process's side, which needs nothing of ray's)
    assert executor and all(imports_ray(path.read_text()) for path in executor if path.stem != "actor")


def test_an_actor_process_imports_none_of_the_drivers_modules():
    """A Ray worker imports `lafid.ray_executor.actor` to build a stage's actor; the driver's router, shard
    writer and progress display, and their pandas and rich, cost each actor ~0.25 CPU-s it never used."""
    driver = ["lafid.router", "lafid.shards", "lafid.progress", "lafid.ray_executor.stream", "pandas", "rich"]

    def loaded(module: str) -> str:
        code = f"import sys, {module}; print([m for m in {driver!r} if m in sys.modules])"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert loaded("lafid.ray_executor.actor") == "[]"
    assert loaded("lafid.ray_executor.stream") == str(driver)  # control: the driver's side imports them all


def test_control_ray_import_inside_a_function_is_found():
    assert imports_ray("def f():\n    from ray.exceptions import RayError\n")
    assert imports_ray("import os, ray\n")
    assert not imports_ray("from lafid.ray_executor import run_ray\nfrom .ray import x\nimport rayon\n")


def test_control_cycle_through_function_level_import_is_found():
    known = {"lafid.p", "lafid.p.a", "lafid.p.b", "lafid.q"}
    a = "from lafid.p import b\n"
    b = "def f():\n    from .a import thing\n    import lafid.q\n"
    graph = {
        "lafid.p.a": imports_of(a, "lafid.p.a", known),
        "lafid.p.b": imports_of(b, "lafid.p.b", known),
        "lafid.q": set(),
    }
    assert graph["lafid.p.a"] == {"lafid.p.b"}  # submodule named in from-import
    assert graph["lafid.p.b"] == {"lafid.p.a", "lafid.q"}  # relative, inside a function
    assert find_cycles(graph) == [["lafid.p.a", "lafid.p.b"]]
    graph["lafid.p.b"].discard("lafid.p.a")
    assert find_cycles(graph) == []


def test_control_cofe_to_bench_import_is_found():
    known = {"lafid.cofe.data", "lafid.bench.exclude"}
    src = "def load():\n    from lafid.bench.exclude import excluded\n"
    graph = {"lafid.cofe.data": imports_of(src, "lafid.cofe.data", known)}
    assert upward_imports(graph) == [("lafid.cofe.data", "lafid.bench.exclude")]


def sources() -> list:
    """Every Python file of the project that imports lafid code."""
    return sorted(p for folder in ("lafid", "stages", "pipelines", "tests", "benchmarks", "scripts")
                  for p in (REPO / folder).rglob("*.py"))


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (*ROOT.rglob("*.py"), *(REPO / "stages").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_pyproject_installs_every_package_folder_stages_and_recipes_under_lafid():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in ROOT.rglob("__init__.py")}
    assert set(config["packages"]) == folders | {"lafid.stages", "lafid.pipelines"}
    assert config["package-dir"] == {"lafid.stages": "stages", "lafid.pipelines": "pipelines"}
    import lafid.pipelines
    import lafid.stages.shot_split

    assert Path(lafid.stages.shot_split.__file__).parent == REPO / "stages"
    assert (Path(lafid.pipelines.__file__).parent / "lafid180k-gpu.yaml").is_file()


def test_nothing_imports_top_level_stages_or_pipelines():
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("stages", "pipelines")]
    assert found == []
