"""Imports a script of ``examples/`` as a module, so the tests run the examples' own code."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def flat_tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by its path: to compare two states bit for bit."""
    import torch

    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out |= flat_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out |= flat_tensors(v, f"{prefix}/{i}")
    return out


def assert_bitwise(a, b, allow_empty=False):
    """Two nested states hold the same tensors, bit for bit (dtype included)."""
    import torch

    fa, fb = flat_tensors(a), flat_tensors(b)
    assert fa.keys() == fb.keys()
    assert fa or allow_empty, "nothing to compare"
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert torch.equal(fa[k], fb[k]), f"{k} differs"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while a test runs (bitwise comparisons, a shared 2-core machine); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
