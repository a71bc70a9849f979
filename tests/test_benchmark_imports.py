"""The benchmark scripts time real work, so the suite does not run them; this keeps them in step with the library:
every histosynth name a benchmark imports (at the top or inside a function) exists, and every keyword it passes to a
histosynth function or class it imported is one that callable takes. A moved or renamed function, or a removed
argument, then fails here, not on the day the benchmark is next run (two had broken that way unnoticed). What it
cannot see is listed in :func:`_unknown_keywords`."""

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


def _scope_nodes(scope: ast.AST):
    """The nodes of one function (or the module) without those of the functions defined inside it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo.extend(ast.iter_child_nodes(node))


_SAME_OBJECT = {"to", "eval", "train", "cpu", "cuda", "float", "half", "requires_grad_"}  # return self


def _class_called(expr: ast.AST, names: dict[str, object]):
    """The imported histosynth class whose instance ``expr`` makes: ``Cls(...)``, ``Cls.from_pretrained(...)`` and
    either followed by ``.to(...)`` / ``.eval()`` and the like; None otherwise."""
    while isinstance(expr, ast.Call):
        func = expr.func
        if isinstance(func, ast.Name):
            cls = names.get(func.id)
            return cls if inspect.isclass(cls) else None
        if not isinstance(func, ast.Attribute):
            return None
        if func.attr in _SAME_OBJECT:
            expr = func.value
        elif func.attr == "from_pretrained" and isinstance(func.value, ast.Name):
            cls = names.get(func.value.id)
            return cls if inspect.isclass(cls) else None
        else:
            return None
    return None


def _unknown_keywords(tree: ast.AST, names: dict[str, object]) -> list[str]:
    """Keywords passed to an imported histosynth callable, or to an instance of an imported class made in the same
    function (a pipeline called as ``pipe(...)``), that it does not take.

    Not checked: methods called on an object (``method.sample(...)``, ``pipe.sample_conditions(...)``) and instances
    made elsewhere (returned by a helper); those break at run time, so they are worth keeping few."""
    wrong = []
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        nodes = list(_scope_nodes(scope))
        callables = dict(names)
        for node in nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                cls = _class_called(node.value, names)
                if cls is not None and "__call__" in vars(cls):
                    callables[node.targets[0].id] = cls.__call__
        for node in nodes:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in callables):
                continue
            try:
                params = inspect.signature(callables[node.func.id]).parameters
            except (TypeError, ValueError):  # a module or a builtin
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            wrong += [f"line {node.lineno}: {node.func.id}({k.arg}=...)" for k in node.keywords
                      if k.arg is not None and k.arg not in params]
    return sorted(set(wrong), key=lambda w: int(w.split()[1].rstrip(":")))


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
                     "    pipe(None, guidance_scale=2.0, sampler='ddim')\n"
                     "    from histosynth.pipelines.disc import DISCPipeline\n"
                     "    other = DISCPipeline(unet=None).to('cpu').eval()\n"
                     "    other(None, separated='final', seperated='final')\n"
                     "def g(pipe):\n"
                     "    pipe(None, anything=1)\n")  # another function's `pipe`: not known here
    names, missing = _histosynth_imports(tree)
    assert missing == ["line 2: histosynth.pipelines.pathldm.classifier_free_guidance"]
    assert _unknown_keywords(tree, names) == ["line 4: use_scheduler(sampler=...)", "line 7: pipe(sampler=...)",
                                              "line 10: other(seperated=...)"]
