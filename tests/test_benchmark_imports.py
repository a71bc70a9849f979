"""The benchmark scripts time real work, so the suite does not run them; this keeps them in step with the library:
every histosynth name a benchmark imports (at the top or inside a function) exists, and every keyword it passes to a
histosynth function or class it imported is one that callable takes. A moved or renamed function, or a removed
argument, then fails here, not on the day the benchmark is next run (three had broken that way unnoticed)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def _histosynth_imports(tree: ast.AST) -> tuple[dict[str, object], list[str]]:
    """{local name: the imported object} of every ``from histosynth... import`` in the file, and what is missing."""
    names, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "histosynth":
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                missing.append(f"line {node.lineno}: {node.module} ({exc})")
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
                    continue
                try:  # a submodule imported by name
                    names[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"line {node.lineno}: {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "histosynth":
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as exc:
                        missing.append(f"line {node.lineno}: {alias.name} ({exc})")
    return names, missing


def _instances(tree: ast.AST, names: dict[str, object]) -> dict[str, object]:
    """{variable: the bound ``__call__``} of ``x = Cls(...)`` / ``x = Cls.from_pretrained(...)`` with Cls an imported
    histosynth class (a pipeline called as ``pipe(...)``)."""
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Call):
            func = node.value.func
            cls = func if isinstance(func, ast.Name) else func.value if isinstance(func, ast.Attribute) else None
            if isinstance(cls, ast.Name) and inspect.isclass(names.get(cls.id)) and "__call__" in vars(names[cls.id]):
                calls[node.targets[0].id] = names[cls.id].__call__
    return calls


def _unknown_keywords(tree: ast.AST, names: dict[str, object]) -> list[str]:
    """Keywords passed to an imported histosynth callable, or to an instance of an imported class, that it does not
    take."""
    wrong, callables = [], {**names, **_instances(tree, names)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in callables):
            continue
        target = callables[node.func.id]
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a module or a builtin
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        wrong += [f"line {node.lineno}: {node.func.id}({k.arg}=...)" for k in node.keywords
                  if k.arg is not None and k.arg not in params]
    return wrong


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_only_what_exists_and_passes_only_known_keywords(script):
    tree = ast.parse(script.read_text(), str(script))
    names, missing = _histosynth_imports(tree)
    assert not missing, f"{script.name} imports what histosynth does not have: {missing}"
    wrong = _unknown_keywords(tree, names)
    assert not wrong, f"{script.name} passes keywords these callables do not take: {wrong}"


def test_the_check_catches_a_moved_name_and_removed_keywords():
    tree = ast.parse("def f():\n"
                     "    from histosynth.pipelines.pathldm import classifier_free_guidance\n"
                     "    from histosynth.diffusion.schedulers import use_scheduler\n"
                     "    use_scheduler(None, 'ddim', sampler='ddim')\n"
                     "    from histosynth.pipelines.nasdm import NASDMPipeline\n"
                     "    pipe = NASDMPipeline(unet=None, scheduler=None)\n"
                     "    pipe(None, guidance_scale=2.0, sampler='ddim')\n")
    names, missing = _histosynth_imports(tree)
    assert missing == ["line 2: histosynth.pipelines.pathldm.classifier_free_guidance"]
    assert _unknown_keywords(tree, names) == ["line 4: use_scheduler(sampler=...)", "line 7: pipe(sampler=...)"]
