"""The import rule of the layout, read from the source: every import, at module level and inside functions.

core imports no stage and never torch; predict imports only core (never torch); train never imports
export or predict; no import cycle among toolkit modules at all.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "toolkit"
TORCH = ("torch", "torchvision", "accelerate", "safetensors", "timm", "onnxscript", "onnx")  # not in the base install


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ("toolkit",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module name `path` imports, anywhere in the file, resolved to absolute names."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """toolkit module -> the toolkit modules it imports (a name imported from a package counts as the package)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {t for t in imports_of(p, root) if t in modules and t != m} for m, p in modules.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ("core", "train", "export", "predict")) else ""


def violations(root: Path = PACKAGE) -> list[str]:
    bad, g = [], graph(root)
    for m, p in sorted({module_name(p, root): p for p in root.rglob("*.py")}.items()):
        s = stage(m)
        third = {i.split(".")[0] for i in imports_of(p, root)}
        inner = {stage(t) for t in g[m]} - {""}
        own = {t for t in g[m] if not stage(t)}  # top-level modules: cli, config, evaluate, the package
        if s in ("core", "predict") and third & set(TORCH):
            bad.append(f"{m} imports {sorted(third & set(TORCH))}")
        if s == "core" and (inner - {"core"} or own - {"toolkit"}):
            bad.append(f"{m} imports a stage or a top-level module: {sorted(inner - {'core'}) + sorted(own - {'toolkit'})}")
        if s == "predict" and (inner - {"core", "predict"} or own - {"toolkit"}):
            bad.append(f"{m} imports beyond core: {sorted(inner - {'core', 'predict'}) + sorted(own - {'toolkit'})}")
        if s == "train" and inner & {"export", "predict"}:
            bad.append(f"{m} imports {sorted(inner & {'export', 'predict'})}")
        if s == "export" and any(stage(t) == "predict" and t != "toolkit.predict.runtime" for t in g[m]):
            bad.append(f"{m} imports predict beyond predict.runtime")
    return bad


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    g, found, done = graph(root), [], set()

    def visit(v: str, path: list[str]) -> None:
        for w in sorted(g[v]):
            if w in path:
                found.append(path[path.index(w):] + [w])
            elif w not in done:
                visit(w, path + [w])
        done.add(v)

    for v in sorted(g):
        if v not in done:
            visit(v, [v])
    return found


def test_the_import_rule_holds():
    assert violations() == []


def test_no_import_cycle():
    assert cycles() == []


@pytest.mark.parametrize("where, line, expect", [
    ("core/metrics.py", "import torch", "imports ['torch']"),
    ("core/images.py", "from toolkit.train import data", "imports a stage"),
    ("predict/run.py", "    from toolkit.export import onnx", "imports beyond core"),  # inside a function too
    ("predict/table.py", "from toolkit.config import load_config", "imports beyond core"),
    ("train/loop.py", "from toolkit.predict.runtime import OnnxClassifier", "imports ['predict']"),
])
def test_a_forbidden_import_is_caught(tmp_path, where, line, expect):
    import shutil

    copy = tmp_path / "toolkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    body = target.read_text()
    target.write_text(body + ("\n\ndef _added():\n" + line + "\n" if line.startswith(" ") else "\n" + line + "\n"))
    assert any(expect in v for v in violations(copy))


def test_a_cycle_is_caught(tmp_path):
    import shutil

    copy = tmp_path / "toolkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "images.py").write_text((copy / "core" / "images.py").read_text() +
                                             "\n\ndef _late():\n    from toolkit.core import pictures\n")
    assert any("toolkit.core.images" in c and "toolkit.core.pictures" in c for c in cycles(copy))


def test_each_contract_constant_is_written_once():
    """The pixel cap and the default normalisation are literals in one place; everything else names them."""
    counts: dict[float, list[str]] = {89_478_485: [], 0.485: [], 0.229: []}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value in counts:
                counts[node.value].append(str(path.relative_to(PACKAGE)))
    assert counts == {89_478_485: ["core/meta.py"], 0.485: ["core/meta.py"], 0.229: ["core/meta.py"]}
