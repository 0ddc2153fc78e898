"""The import graph of merit_jax has no cycle (module-level and function-level imports alike, not the
`if TYPE_CHECKING:` ones)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "merit_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# The rooms of docs/ARCHITECTURE.md, lowest first: a module imports only from its own layer or below.
LAYERS = [
    ("foundation", ("merit_jax.errors", "merit_jax.sharding", "merit_jax.losses", "merit_jax.config")),
    ("models", ("merit_jax.models",)),
    ("io and data", ("merit_jax.io", "merit_jax.data", "merit_jax.workdir", "merit_jax.artifacts")),
    ("library", ("merit_jax.training", "merit_jax.gradients", "merit_jax.partition", "merit_jax.merging",
                 "merit_jax.sketch", "merit_jax.alignment", "merit_jax.hessian", "merit_jax.diagnostics",
                 "merit_jax.evaluation", "merit_jax.report", "merit_jax.plots",
                 "merit_jax.plan_programs", "merit_jax.hardware", "merit_jax.distributed",
                 "merit_jax.lmms_eval_functions")),
    ("drivers", ("merit_jax.stages", "merit_jax.main", "merit_jax.plan", "merit_jax.merge", "merit_jax.convert",
                 "merit_jax.lm_eval_task", "merit_jax.lmms_eval_task", "merit_jax")),
]
CONFIG_READERS = ("merit_jax/stages/", "merit_jax/main.py", "merit_jax/config.py")
MAX_LINES = 600


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_imports.py LAYERS (docs/ARCHITECTURE.md)"
    return best[0]


def test_imports_run_one_way():
    modules = _modules()
    wrong = []
    for m, f in sorted(modules.items()):
        for target in sorted(_imports(m, f, modules)):
            if _layer(target) > _layer(m) or (target.startswith("merit_jax.stages") and
                                               not m.startswith(("merit_jax.stages", "merit_jax.main"))):
                wrong.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports against the direction of docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_only_the_drivers_read_the_config_dict():
    readers = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).as_posix()
        if not rel.startswith(CONFIG_READERS):
            readers += [f"{rel}:{i}" for i, line in enumerate(f.read_text().splitlines(), 1) if "cfg." in line]
    assert not readers, "the ConfigDict read below the stage drivers: " + ", ".join(readers)


def test_modules_stay_short():
    long = {f.relative_to(PACKAGE.parent).as_posix(): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
