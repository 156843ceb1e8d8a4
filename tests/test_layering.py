"""The package's layers never import upwards (core < ops < sim < adapters < bench < commands < cli), the policy core
imports the standard library only, and no source file grows past 400 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvsched"
LAYERS = {"core": 0, "ops": 1, "sim": 2, "tiny_model": 2, "serving": 2, "serving_in_engine": 2, "install_check": 2,
          "adapters": 3, "bench": 4, "commands": 5, "cli": 6, "__init__": 0, "_C": 1}
MAX_LINES = 400


def layer_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "__init__"
    return LAYERS[part]


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in `path`, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") or "kvsched"


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        src = module_name(path)
        for target, line in imports(path):
            if target.startswith("kvsched.") and layer_of(target) > layer_of(src):
                bad.append(f"{path.relative_to(ROOT)}:{line} {src} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_policy_core_imports_the_standard_library_only():
    stdlib = sys.stdlib_module_names
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for p in (PACKAGE / "core").rglob("*.py")
           for t, line in imports(p) if t.split(".")[0] not in stdlib and not t.startswith("kvsched.core")]
    assert not bad, "\n".join(bad)


def test_no_source_file_is_over_400_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "csrc").rglob("*.cpp"),
             *(ROOT / "csrc").rglob("*.h"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]
    long = sorted(f"{p.relative_to(ROOT)}: {n}" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, "\n".join(long)


def test_the_checks_see_a_violation():
    assert layer_of("kvsched.bench.common") > layer_of("kvsched.adapters.ray.loadtest")
    assert layer_of("kvsched.core.tier") < layer_of("kvsched.ops.fp8")
