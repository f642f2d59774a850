"""The official Self-Flow release code (../shared/third_party/selfflow_release), imported at test time.

Its model needs timm's Attention and Mlp. timm's package __init__ pulls torchvision (for data
transforms), and PyPI has no torchvision build for this CPU torch (2.13.0+cpu): when
`timm.models.vision_transformer` cannot be imported, timm's own layers/attention.py and
layers/mlp.py are loaded from the installed timm without its package __init__ files, and exposed
under that name. The classes are timm's, unchanged.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest

RELEASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "third_party" / "selfflow_release"


def _timm_layers_without_torchvision() -> None:
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("the official Self-Flow model needs timm: pip install timm==1.0.31 --no-deps")
    root = Path(spec.submodule_search_locations[0])
    for name, folder in (("timm", root), ("timm.layers", root / "layers"), ("timm.models", root / "models")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(folder)]  # a package whose __init__ is not run
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = mod
    attention = importlib.import_module("timm.layers.attention")
    mlp = importlib.import_module("timm.layers.mlp")
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.Attention, vit.Mlp = attention.Attention, mlp.Mlp
    sys.modules[vit.__name__] = vit


def _load(name: str, file: Path):
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def release_modules():
    """(model module, sampling module) of the release; skips with a message when absent."""
    if not (RELEASE / "src" / "model.py").is_file():
        pytest.skip(f"official Self-Flow code not found at {RELEASE} (the ../shared checkout)")
    pytest.importorskip("einops")
    try:
        importlib.import_module("timm.models.vision_transformer")
    except Exception:  # noqa: BLE001 - no torchvision (ImportError), or a CUDA build of it (RuntimeError)
        _timm_layers_without_torchvision()
    return (_load("selfflow_release_model", RELEASE / "src" / "model.py"),
            _load("selfflow_release_sampling", RELEASE / "src" / "sampling.py"))
