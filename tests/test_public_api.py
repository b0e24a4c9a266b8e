"""The public API imports from the package root; 0.1 module paths still work, with a warning."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fatezero_fast

PUBLIC = ["FateZeroPipeline", "Inversion", "FateZeroController", "EditOptions", "blended_attention",
          "blend_mask", "load_video", "save_video", "InputError", "SourceForm"]


@pytest.mark.parametrize("name", PUBLIC)
def test_root_exports(name):
    assert name in fatezero_fast.__all__
    assert getattr(fatezero_fast, name) is not None


@pytest.mark.parametrize("old,new,name", [("pipeline", "edit.pipeline", "FateZeroPipeline"),
                                          ("controller", "edit.controller", "FateZeroController"),
                                          ("control", "semantics.plan", "EditOptions"),
                                          ("store", "stores", "make_store"),
                                          ("video", "io.video", "load_video")])
def test_old_paths_warn_and_alias(old, new, name):
    sys.modules.pop(f"fatezero_fast.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"fatezero_fast.{old} moved to fatezero_fast.{new}"):
        module = importlib.import_module(f"fatezero_fast.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(f"fatezero_fast.{new}"), name)


def _package_imports() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere (module level or inside functions)."""
    root = Path(fatezero_fast.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [(base, f"{base}.{a.name}") for a in node.names]  # a submodule, else the module
            elif isinstance(node, ast.Import):
                targets = [(a.name, a.name) for a in node.names]
            else:
                continue
            deps.update(targets)
        graph[name] = deps
    return {m: {sub if sub in graph else base for base, sub in deps} & set(graph) - {m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = _package_imports()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_root_import_is_light():
    code = "import sys, fatezero_fast; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
