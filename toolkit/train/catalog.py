"""The registered model names, known without importing torch.

`toolkit models` lists them and `toolkit train` / `toolkit config` check `model.arch` against
them before torch is imported or any data is read. They are read from the @register_model
functions of models.py (name and first docstring line), which stays the one place a model is
defined; tests/test_models.py holds that this list equals the live registry. timm names are
checked with timm's own list, only for `timm/<name>` and names the registry does not know (bare timm
names like resnet18): importing timm imports torch. A near miss of a built-in name (resnet_smal) is
a typo, reported without importing timm.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

from toolkit import UserError

MODELS_SOURCE = Path(__file__).with_name("models.py")
TYPO_CUTOFF = 0.8  # difflib ratio from which an unknown name is a typo of a built-in one (resnet_smal, not resnet18)


def builtin_models() -> dict[str, str]:
    """Registered names -> first line of their docstring, sorted by name."""
    found = {}
    for node in ast.parse(MODELS_SOURCE.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "register_model" for d in node.decorator_list):
            found[node.name] = (ast.get_docstring(node) or "").strip().partition("\n")[0]
    return dict(sorted(found.items()))


def _bare_timm_name(arch: str) -> bool:
    """A timm model name without the timm/ prefix, e.g. resnet18: read from timm's sources, like the
    registry above (timm's @register_model functions), so that no torch is imported."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return False
    pattern = re.compile(rf"@register_model\s*\ndef {re.escape(arch)}\(")
    for folder in spec.submodule_search_locations:
        for path in (Path(folder) / "models").glob("*.py"):
            if f"def {arch}(" in (text := path.read_text(errors="replace")) and pattern.search(text):
                return True
    return False


def check_arch(arch: str, known: dict | None = None) -> None:
    """Raise UserError unless `arch` names a model: `known` (default: the built-in ones) or timm/<name>."""
    if arch.startswith("timm/"):
        try:
            import timm
        except ImportError:
            raise UserError(f"model.arch '{arch}' needs timm: pip install 'toolkit[timm]'") from None
        name = arch[len("timm/"):]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            hint = f"; did you mean 'timm/{close[0]}'?" if close else "; see timm.list_models()"
            raise UserError(f"unknown model.arch '{arch}': timm has no model '{name}'{hint}")
        return
    known = builtin_models() if known is None else known
    if arch in known:
        return
    typo = difflib.get_close_matches(arch, list(known), n=1, cutoff=TYPO_CUTOFF)
    if typo:  # a near miss of a built-in name: said at once, without importing timm (and so torch)
        raise UserError(f"unknown model.arch '{arch}'; did you mean '{typo[0]}'? (`toolkit models` lists them; "
                        f"a timm model of that name: timm/{arch})")
    if _bare_timm_name(arch):
        return
    if arch not in known:
        close = difflib.get_close_matches(arch, list(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(sorted(known))}"
        raise UserError(f"unknown model.arch '{arch}'{hint} (`toolkit models` lists them)")
