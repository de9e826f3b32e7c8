"""The layering docs/ARCHITECTURE.md promises, checked on the source and at import time.

* the shared core (sketch_walk/core/) imports neither method (Sketch&Walk's modules, seer_attn) nor the harness;
* seer_attn imports, of sketch_walk, only the core: never a Sketch&Walk method module;
* the method packages import the harness (``eval``) only in a ``__main__`` block (their documented commands,
  ``python -m sketch_walk.checkpoint`` and ``python -m seer_attn.train_gates``, live in eval/ruler/);
* no file outside tests/ edits ``sys.path`` (the editable install puts the repository root on it).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tracked_py():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / f for f in out.split()]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path):
    """(absolute module imported, line, inside a __main__ block) for every import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    main_lines = set()
    for node in tree.body:
        if _is_main_guard(node):
            main_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # "from pkg import sub" may import a submodule: count pkg.sub for each name
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            found.append((name, node.lineno, node.lineno in main_lines))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(files, bad):
    out = []
    for f in files:
        for name, line, in_main in imports_of(f):
            reason = bad(name, in_main)
            if reason:
                out.append(f"{f.relative_to(REPO)}:{line} imports {name} ({reason})")
    return out


def _method_module(name: str) -> bool:
    """A module of the Sketch&Walk method: in sketch_walk/ but not the core (the package itself is neutral)."""
    return _under(name, "sketch_walk") and name != "sketch_walk" and not _under(name, "sketch_walk.core")


def _existing(name: str) -> bool:
    """Whether an imported name is a module or package of this repository (not a class or function)."""
    rel = Path(*name.split("."))
    return (REPO / rel.with_suffix(".py")).is_file() or (REPO / rel / "__init__.py").is_file()


def test_core_imports_no_method_and_no_harness():
    files = [f for f in _tracked_py() if _under(_module_name(f), "sketch_walk.core")]
    assert len(files) >= 8

    def bad(name, in_main):
        if _method_module(name) and _existing(name):
            return "a Sketch&Walk method module"
        if _under(name, "seer_attn"):
            return "a method"
        if _under(name, "eval"):
            return "the harness"
        return None

    assert _violations(files, bad) == []


def test_seer_attn_uses_only_the_core_of_sketch_walk():
    files = [f for f in _tracked_py() if _under(_module_name(f), "seer_attn")]

    def bad(name, in_main):
        if _method_module(name) and _existing(name):
            return "a Sketch&Walk method module: use sketch_walk.core"
        if name == "sketch_walk":
            return "the sketch_walk package's names are the method's: import from sketch_walk.core"
        if _under(name, "eval") and not in_main:
            return "the harness, outside a __main__ block"
        return None

    assert _violations(files, bad) == []


def test_methods_import_the_harness_only_in_main_blocks():
    files = [f for f in _tracked_py() if _under(_module_name(f), "sketch_walk") or _under(_module_name(f), "seer_attn")]
    assert _violations(files, lambda name, in_main: "the harness" if _under(name, "eval") and not in_main else None) == []


def test_no_file_outside_tests_edits_sys_path():
    offenders = []
    for f in _tracked_py():
        if f.relative_to(REPO).parts[0] == "tests":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value                          # sys.path.insert(...), sys.path.append(...)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets), None)
            if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                    and target.value.id == "sys"):
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_importing_seer_attn_loads_no_sketch_walk_method_module():
    """At run time too: importing SeerAttention (its selector and distillation) loads the core only."""
    code = ("import sys, json; import seer_attn, seer_attn.selector, seer_attn.distill, seer_attn.checkpoint; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sketch_walk', 'eval'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "sketch_walk.core.hook" in loaded
    assert [m for m in loaded if m != "sketch_walk" and not m.startswith("sketch_walk.core")] == []


def test_the_checker_sees_violations():
    """The import resolution above is not vacuous: relative and absolute forms resolve to the right modules."""
    probe = REPO / "seer_attn" / "selector.py"
    names = {n for n, _, _ in imports_of(probe)}
    assert "sketch_walk.core.contract" in names and "seer_attn.config" in names
    sel = {n for n, _, _ in imports_of(REPO / "sketch_walk" / "selector.py")}
    assert "sketch_walk.core.hook" in sel and "sketch_walk.walk" in sel and _method_module("sketch_walk.walk")
    main_only = [(n, m) for n, _, m in imports_of(REPO / "seer_attn" / "train_gates.py") if _under(n, "eval")]
    assert main_only and all(m for _, m in main_only)
