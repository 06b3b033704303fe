"""The package's layers: a module imports only from its own layer or the ones below it
(tools > engine > spec > worker > model > the torch-free base), and the base never loads torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "orthrus_runtime"
# Higher numbers may import lower ones. The base: plain data, defaults, the gRPC stubs and client,
# the request rules and the Prometheus metrics (read by the Serve layer without the model stack).
RANK = {"types": 0, "defaults": 0, "validation": 0, "proto": 0, "client": 0, "metrics": 0, "data": 0,
        "model": 1, "worker": 2, "spec": 3, "engine": 4, "tools": 5}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.startswith("orthrus_runtime.") else ""


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orthrus_runtime"):
            if node.module == "orthrus_runtime":
                out += [f"orthrus_runtime.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("orthrus_runtime.")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append("relative")
    return out


def test_imports_only_go_down_the_layers():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        layer = rel.parts[1]
        if layer == "__init__":
            continue
        own = RANK[layer]
        for mod in _imports(path):
            if mod == "relative":
                if layer not in ("proto", "client"):
                    bad.append(f"{rel}: relative import (use the absolute layer path)")
                continue
            target = _layer(mod)
            if target and RANK[target] > own:
                bad.append(f"{rel} ({layer}) imports {mod} ({target})")
    assert not bad, "\n".join(bad)


def test_base_layer_and_engine_args_do_not_load_torch():
    """The Serve controller and the clients import these without the model stack."""
    code = ("import sys; import orthrus_runtime.types, orthrus_runtime.defaults, orthrus_runtime.metrics, orthrus_runtime.validation, "
            "orthrus_runtime.client, orthrus_runtime.engine.args; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
