"""Every vLLM internal goes through `kvsched/adapters/vllm/compat/`: no other module imports a private vLLM name,
reads or calls a private attribute that vLLM defines (kvsched's own same-named attributes aside), or overrides or reads
a private member of a vLLM base class. When vLLM changes, compat (and its version check) is the one place to look."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvsched"
BOUNDARY = set((PACKAGE / "adapters" / "vllm" / "compat").rglob("*.py"))
VLLM_PARTS = ("v1", "config", "distributed/kv_transfer", "entrypoints", "engine", "utils", "platforms")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_private(tree: ast.AST) -> set[str]:
    """Private names `tree` defines: functions, `self._x = ...` targets, class and module attributes."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
            out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
            out.add(node.id)
    return out


@functools.cache
def vllm_private_names() -> frozenset[str]:
    """Private names anywhere in the parts of vLLM kvsched touches."""
    root = Path(pytest.importorskip("vllm").__file__).parent
    return frozenset(n for part in VLLM_PARTS for p in (root / part).rglob("*.py")
                     for n in defined_private(ast.parse(p.read_text(errors="replace"))))


@functools.cache
def class_private_names(module: str, name: str) -> frozenset[str]:
    """Private members of vLLM class `module.name` and its bases: methods and attributes their code assigns."""
    cls = getattr(importlib.import_module(module), name)
    out: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm"):
            continue
        out |= {n for n in vars(klass) if _private(n)}
        try:
            out |= defined_private(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError):
            pass
    return frozenset(out)


def vllm_imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> vLLM module of every name imported from vLLM."""
    return {a.asname or a.name: n.module for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vllm") for a in n.names}


def _is_self(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("self", "cls")) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super")


def violations(rel: Path | str, tree: ast.AST, own: set[str], vllm_private: frozenset[str],
               base_private=class_private_names) -> list[str]:
    out = []
    imported = vllm_imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
            bad = [a.name for a in node.names if _private(a.name)]
            if bad or any(_private(p) for p in node.module.split(".")):
                out.append(f"{rel}:{node.lineno} imports a private vLLM name: {node.module} {bad}")
        elif isinstance(node, ast.ClassDef):
            bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in imported]
            inherited = frozenset().union(*(base_private(imported[b], b) for b in bases))
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in inherited:
                    out.append(f"{rel}:{item.lineno} {node.name} overrides vLLM's private {item.name}")
                elif isinstance(item, ast.Attribute) and _is_self(item.value) and item.attr in inherited:
                    out.append(f"{rel}:{item.lineno} {node.name} uses its vLLM base's private .{item.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _private(node.attr):
            if node.attr in vllm_private and node.attr not in own and not _is_self(node.value):
                out.append(f"{rel}:{node.lineno} reads vLLM's private .{node.attr}")
    return sorted(set(out))


def test_no_module_outside_compat_touches_a_private_vllm_name():
    vllm_private = vllm_private_names()
    trees = {p: ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
    own = set().union(*(defined_private(t) for p, t in trees.items() if p not in BOUNDARY))
    bad = [v for p, t in trees.items() if p not in BOUNDARY
           for v in violations(p.relative_to(ROOT), t, own, vllm_private)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_each_kind_of_violation():
    tree = ast.parse(
        "from vllm.v1.core.sched.scheduler import Scheduler\n"
        "from vllm.v1.core.block_pool import _helper\n"
        "class S(Scheduler):\n"
        "    def _free_blocks(self, request):\n"
        "        self._mine = 1\n"
        "        return super()._free_blocks(request), self.kv_cache_manager._pending, self._mine\n")
    found = violations("m.py", tree, {"_mine"}, frozenset({"_pending", "_mine"}),
                       base_private=lambda module, name: frozenset({"_free_blocks"}))
    assert found == ["m.py:2 imports a private vLLM name: vllm.v1.core.block_pool ['_helper']",
                     "m.py:4 S overrides vLLM's private _free_blocks",
                     "m.py:6 S uses its vLLM base's private ._free_blocks",
                     "m.py:6 reads vLLM's private ._pending"]
