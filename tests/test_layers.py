"""The floors of the codebase: imports go down (or sideways), never up, and never round in a circle.

Every .py file under minilm/ and data_prep/ is read with `ast` (nothing is imported), and every
import of a project module is collected: at top level, inside functions, under TYPE_CHECKING.
FLOORS lists the floors from top (the command line) to bottom (ops, tokenizer, config). A file may
import modules on its own floor or any floor below it. A pattern ending in "/" is a whole package,
its __init__ included; any other pattern is one file. Patterns naming missing files are skipped.
lessons/00_overview.md draws the same map in prose.

Also checked: no import cycles, and no stage (minilm/stages/*.py) imports another stage. The last
test builds a tiny fake tree to show the checker can fail.
"""

import ast
from pathlib import Path
from typing import NamedTuple

FLOORS = [
    ("interface",  ["minilm/cli.py", "minilm/cli_checkpoints.py", "minilm/cli_flags.py", "minilm/cli_results.py",
                    "minilm/chat_cli.py", "minilm/serve/", "minilm/__main__.py"]),
    ("driver",     ["minilm/speedrun/"]),
    ("evaluation", ["minilm/eval/"]),
    ("stages",     ["minilm/stages/"]),
    ("pieces",     ["minilm/post/", "minilm/agents/", "minilm/prune/"]),
    ("loop",       ["minilm/loop.py", "minilm/resume.py", "minilm/run_dir.py"]),
    ("services",   ["data_prep/", "minilm/checkpoint.py", "minilm/generate.py", "minilm/lora.py", "minilm/lora_io.py",
                    "minilm/memory.py", "minilm/hf_tokenizer.py"]),
    ("core",       ["minilm/model.py", "minilm/data.py", "minilm/runtime.py", "minilm/weights.py", "minilm/fsdp.py"]),
    ("base",       ["minilm/ops/", "minilm/bpe_train.py", "minilm/tokenizer.py", "minilm/sp_tokenizer.py",
                    "minilm/config.py", "minilm/plots.py", "minilm/__init__.py"]),
]

ROOT = Path(__file__).resolve().parent.parent   # the repo root
PACKAGES = ("minilm", "data_prep")
IGNORED = ("minilm._C",)                        # the compiled kernels: no Python source, imports nothing
STAGES = "minilm/stages/"


class Edge(NamedTuple):
    """One import: `source` (a file, relative to the root) imports module `target` at `line`."""
    source: str
    line: int
    target: str


# ---- reading the tree ----

def project_files(root: Path) -> list[str]:
    """Every .py file of the project, as a posix path relative to the root."""
    return sorted(p.relative_to(root).as_posix()
                  for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def module_name(path: str) -> str:
    """minilm/post/chat.py -> minilm.post.chat; minilm/post/__init__.py -> minilm.post."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(root: Path, name: str) -> str | None:
    """The file of module `name` (a package's __init__.py), or None if there is no such module."""
    path = name.replace(".", "/")
    if (root / f"{path}.py").is_file():
        return f"{path}.py"
    if (root / path).is_dir():
        return f"{path}/__init__.py"
    return None


def resolve(root: Path, candidates: list[str]) -> str:
    """The first candidate that is a real module, else the longest existing prefix of the last."""
    for name in candidates:
        if module_file(root, name):
            return name
    parts = candidates[-1].split(".")
    while len(parts) > 1 and not module_file(root, ".".join(parts)):
        parts.pop()
    return ".".join(parts)


def is_ignored(name: str) -> bool:
    return any(name == i or name.startswith(i + ".") for i in IGNORED)


def imports_of(root: Path, path: str) -> list[Edge]:
    """Every project import in one file, wherever it sits in the file."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=path)
    here = module_name(path).split(".")
    package = here if path.endswith("__init__.py") else here[:-1]
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: `from . import x`, `from ..post import chat`
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            wanted = [[f"{base}.{alias.name}", base] for alias in node.names]
        else:
            continue
        targets = [resolve(root, names) for names in wanted
                   if names[-1].split(".")[0] in PACKAGES and not is_ignored(names[0])]
        for target in dict.fromkeys(targets):   # `from m import a, b` is one edge
            edges.append(Edge(path, node.lineno, target))
    return edges


def all_imports(root: Path) -> list[Edge]:
    return [edge for path in project_files(root) for edge in imports_of(root, path)]


# ---- the checks (each returns a list of problems; empty means fine) ----

def floor_of(path: str | None, floors) -> int | None:
    """The index (0 = top) of the floor holding this file, or None."""
    for index, (_, patterns) in enumerate(floors):
        for pattern in patterns:
            if path == pattern or (pattern.endswith("/") and path and path.startswith(pattern)):
                return index
    return None


def unplaced_files(root: Path, floors) -> list[str]:
    return [f"add {path} to a floor in FLOORS" for path in project_files(root)
            if floor_of(path, floors) is None]


def upward_imports(root: Path, floors) -> list[str]:
    problems = []
    for edge in all_imports(root):
        low, high = floor_of(edge.source, floors), floor_of(module_file(root, edge.target), floors)
        if low is not None and high is not None and high < low:
            problems.append(f"{edge.source} ({floors[low][0]}) -> {edge.target} ({floors[high][0]})"
                            f"  [line {edge.line}]")
    return problems


def import_cycles(root: Path) -> list[str]:
    """Tarjan's strongly connected components of the module graph; each one of size > 1 is a cycle."""
    graph: dict[str, set[str]] = {module_name(p): set() for p in project_files(root)}
    edges = all_imports(root)
    for edge in edges:
        source = module_name(edge.source)
        if edge.target != source:
            graph[source].add(edge.target)
            graph.setdefault(edge.target, set())
    order, low, stack, components = {}, {}, [], []

    def visit(node):
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:   # node roots a component: pop it off the stack
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return ["cycle among: " + ", ".join(c) + "".join(f"\n  {e.source}:{e.line} -> {e.target}"
            for e in edges if module_name(e.source) in c and e.target in c) for c in components]


def stage_to_stage_imports(root: Path, folder: str = STAGES) -> list[str]:
    """Imports from a stage file to anything in the stages package (its __init__ included)."""
    return [f"{edge.source} -> {edge.target}  [line {edge.line}]" for edge in all_imports(root)
            if edge.source.startswith(folder) and not edge.source.endswith("/__init__.py")
            and (module_file(root, edge.target) or "").startswith(folder)]


# ---- the tests on the real tree ----

def test_every_module_sits_on_a_floor():
    problems = unplaced_files(ROOT, FLOORS)
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_higher_floor():
    problems = upward_imports(ROOT, FLOORS)
    assert not problems, "imports that go up a floor:\n" + "\n".join(problems)


def test_the_project_imports_have_no_cycle():
    problems = import_cycles(ROOT)
    assert not problems, "\n".join(problems)


def test_no_stage_imports_another_stage():
    problems = stage_to_stage_imports(ROOT)
    assert not problems, "stages must not import each other:\n" + "\n".join(problems)


# ---- the checker can fail ----

def test_the_checker_catches_an_upward_import_a_cycle_and_a_stray_file(tmp_path):
    files = {
        "minilm/__init__.py": "",
        "minilm/high.py": "import minilm.low\nimport minilm._C\n",
        "minilm/low.py": "def late():\n    from minilm.high import thing\n",
        "minilm/stray.py": "",
        "minilm/stages/__init__.py": "from . import a, b\n",
        "minilm/stages/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "minilm/stages/b.py": "",
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    floors = [("top", ["minilm/high.py", "minilm/stages/", "minilm/missing.py"]),
              ("bottom", ["minilm/low.py", "minilm/__init__.py"])]

    assert unplaced_files(tmp_path, floors) == ["add minilm/stray.py to a floor in FLOORS"]
    assert upward_imports(tmp_path, floors) == ["minilm/low.py (bottom) -> minilm.high (top)  [line 2]"]
    assert import_cycles(tmp_path) == ["cycle among: minilm.high, minilm.low\n"
                                       "  minilm/high.py:1 -> minilm.low\n  minilm/low.py:2 -> minilm.high"]
    assert stage_to_stage_imports(tmp_path) == ["minilm/stages/a.py -> minilm.stages.b  [line 3]"]
