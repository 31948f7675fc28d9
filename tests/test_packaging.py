"""The package as it is published: ``python -m build`` makes a wheel and an sdist that
``twine check`` passes, with complete metadata, and a fresh venv that installs the wheel
(not the source tree) imports it, reports the version and trains."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import scalable_shampoo

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "src", "scalable_shampoo_bench",
           "examples"]  # fmt: skip
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "results", "build", "dist")


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Builds from a copy of the sources, so that the build leaves nothing in the work tree."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=IGNORE) if (ROOT / name).is_dir()
         else shutil.copy(ROOT / name, src / name))  # fmt: skip
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the setuptools installed here (>= 77, as pyproject.toml asks)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    return wheels[0], sdists[0]


def test_twine_check_passes(dist):
    out = run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)])
    assert out.count("PASSED") == 2


def test_wheel_holds_only_the_projects_packages_with_py_typed(dist):
    wheel, _ = dist
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {
        "scalable_shampoo",
        "scalable_shampoo_bench",
        f"scalable_shampoo-{scalable_shampoo.__version__}.dist-info",
    }
    assert "scalable_shampoo/py.typed" in names
    assert f"scalable_shampoo-{scalable_shampoo.__version__}.dist-info/licenses/LICENSE" in names


def test_metadata_is_complete_and_the_version_has_one_source(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(f"scalable_shampoo-{scalable_shampoo.__version__}.dist-info/METADATA").decode())
    assert meta["Name"] == "scalable-shampoo"
    assert meta["Version"] == scalable_shampoo.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert meta["Summary"] and meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown" and "# scalable-shampoo" in meta.get_payload()
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and any(c.startswith("Development Status") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= urls.keys()
    assert {"test", "bench", "integrations"} <= set(meta.get_all("Provides-Extra"))
    assert any(r.startswith("transformers>=") and 'extra == "integrations"' in r for r in meta.get_all("Requires-Dist"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M)  # a literal is written only in __init__.py
    assert 'version = { attr = "scalable_shampoo.__version__" }' in pyproject
    assert f"## [{scalable_shampoo.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "src/scalable_shampoo/py.typed",
        "examples/hf_trainer.py",
    } <= members


SMOKE = """
import pathlib, sys, torch
import scalable_shampoo
from scalable_shampoo import Shampoo
here = pathlib.Path(scalable_shampoo.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in here.parents, here  # the venv's copy, not the source tree
assert (here.parent / "py.typed").is_file()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
x, y = torch.randn(64, 8), torch.randn(64, 2)
opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=2, start_preconditioning_step=2)
losses = []
for _ in range(10):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
assert losses[-1] < losses[0] and any(r["has_root"] for r in opt.diagnostics()["blocks"])
print(scalable_shampoo.__version__, here)
"""


def test_a_fresh_venv_installs_the_wheel_and_trains(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    # torch comes from this interpreter's site-packages (--system-site-packages: copying a
    # torch wheel into the venv would take minutes); the project comes from the wheel only
    run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    run([*pip, "--force-reinstall", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run([str(python), "-c", SMOKE], cwd=tmp_path, env=env)
    version, location = out.split()
    assert version == scalable_shampoo.__version__ and str(venv) in location
    script = (venv / "bin" / "shampoo-bench").read_text()  # the console script, installed into the venv
    assert script.startswith(f"#!{python}") and "scalable_shampoo_bench.cli" in script
