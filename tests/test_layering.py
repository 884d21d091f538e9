"""The dependency rules of README.md's Layout section, checked on the source: every import of a
mogelm module (top level or inside a function) must point down the layers, never up."""

import re
from pathlib import Path

import mogelm

ROOT = Path(mogelm.__file__).parent
IMPORT = re.compile(r"^\s*(?:from\s+(mogelm(?:\.\w+)*)\s+import\s+([\w, ()]+)"
                    r"|import\s+(mogelm(?:\.\w+)*))", re.M)

# What each part may import (besides itself). A part is a top-level module or a subpackage.
ALLOWED = {
    "config": set(),
    "errors": set(),
    "fsutil": {"errors"},
    "kernels": {"config"},
    "moe": {"kernels", "config"},
    # mtp.py holds the model's optional multi-token-prediction modules (built by the Transformer)
    "model": {"mtp", "moe", "kernels", "config"},
    "mtp": {"model", "moe", "kernels", "config"},
    "quant": {"model", "moe", "kernels", "config"},
    "hf_config": {"config", "errors"},
    "checkpoint": {"hf_config", "model", "quant", "moe", "kernels", "config", "errors", "fsutil"},
    "data": {"config", "errors", "fsutil"},
    "analysis": {"kernels", "config", "errors"},
    "sim": {"analysis", "kernels", "config", "errors", "hf_config"},
    "evaluate": {"analysis", "checkpoint", "hf_config", "data", "model", "config", "errors"},
    # parallel/ is applied to a model from outside; the training loop uses it, never the reverse
    "parallel": {"model", "moe", "kernels", "config", "errors", "fsutil"},
    "train": {"parallel", "evaluate", "analysis", "checkpoint", "hf_config", "data", "model", "mtp", "moe",
              "kernels", "config", "errors", "fsutil"},
    "inference": {"checkpoint", "hf_config", "quant", "model", "mtp", "moe", "kernels", "config", "errors",
                  "fsutil"},
    "compare": {"train", "analysis", "config", "errors", "fsutil"},
    "info": {"checkpoint", "hf_config", "config", "errors"},
}


def _part(module: str) -> str:
    """'mogelm.moe.layer' -> 'moe'; 'mogelm' (the package face) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for m in IMPORT.finditer(path.read_text()):
        if m.group(1):
            base = m.group(1)
            if base == "mogelm":  # `from mogelm import data` names submodules
                names = (n.split(" as ")[0].strip() for n in m.group(2).strip("()").split(","))
                found |= {f"mogelm.{n}" for n in names if n}
            else:
                found.add(base)
        else:
            found.add(m.group(3))
    return {_part(x) for x in found} - {""}


def _files(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py")) if (ROOT / part).is_dir() else [ROOT / f"{part}.py"]


def test_each_layer_imports_only_the_layers_below_it():
    offenders = []
    for part, allowed in ALLOWED.items():
        for f in _files(part):
            bad = _imports(f) - allowed - {part}
            if bad:
                offenders.append(f"{f.relative_to(ROOT)} imports {sorted(bad)}")
    assert offenders == []


def test_nothing_imports_the_cli_or_the_commands():
    offenders = [str(f.relative_to(ROOT)) for f in ROOT.rglob("*.py")
                 if f.parent.name != "commands" and f.name not in ("cli.py", "__main__.py")
                 and _imports(f) & {"cli", "commands"}]
    assert offenders == []


def test_model_code_never_touches_torch_distributed():
    """Parallelism is applied from outside (DESIGN.md §4): model, moe and kernels are math only."""
    offenders = [str(f.relative_to(ROOT)) for part in ("model", "moe", "kernels") for f in _files(part)
                 if re.search(r"^\s*(from|import)\s+torch\.distributed", f.read_text(), re.M)]
    assert offenders == []


def test_the_checker_sees_imports():
    """Guard against a rule that passes because the regex reads nothing."""
    assert _imports(ROOT / "model.py") >= {"moe", "config"}
    assert "kernels" in _imports(ROOT / "moe" / "experts.py")
