"""`pip install .` is the functional loss import: the wheel requires jax and numpy only, and tregjax.losses (the
README's snippet) runs in a fresh venv that holds nothing but the wheel and the closure of what jax and numpy require,
as their installed metadata declares it. The [train] extra is requirements.txt; the console scripts run the commands
(without [train]: one line naming the missing package).

The venv gets no package index (fast, no network): the wheel is installed with --no-deps, and the dependency closure
is made visible through a .pth directory of links to exactly those distributions' files, so a tregjax.losses import
of anything else (flax, transformers, ...) fails here as it would for a user."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT

SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "requirements-tpu.txt", "packaging", "tregjax")


def _name(requirement: str) -> str:
  return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]).lower()


def _closure(roots: list[str]) -> set[str]:
  """Distribution names `roots` need at run time (no extras), from the installed metadata."""
  seen, todo = set(), list(roots)
  while todo:
    name = _name(todo.pop())
    if name in seen:
      continue
    seen.add(name)
    for req in importlib.metadata.requires(name) or []:
      if "extra ==" not in req:
        marker = req.split(";", 1)[1] if ";" in req else ""
        if "python_version >= \"3.1" in marker and sys.version_info < (3, 13):
          continue  # a newer Python's stricter pin of a package already in the closure
        todo.append(req.split(";", 1)[0])
  return seen


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  for item in SOURCES:  # build from a copy: the checkout gets no build/ or egg-info
    copy = shutil.copytree if os.path.isdir(os.path.join(REPO_ROOT, item)) else shutil.copy
    copy(os.path.join(REPO_ROOT, item), src / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                        if copy is shutil.copytree else {}))
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                         "-w", str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = out.glob("tregjax-*.whl")
  return path


def _metadata(wheel_path):
  with zipfile.ZipFile(wheel_path) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = z.read(name).decode()
    scripts = z.read(name.replace("METADATA", "entry_points.txt")).decode()
  requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
  return requires, scripts


def test_wheel_requires_jax_and_numpy_and_names_the_extras(wheel):
  requires, scripts = _metadata(wheel)
  assert sorted(_name(r) for r in requires if "extra ==" not in r) == ["jax", "numpy"]
  extras = {}
  for r in requires:
    if "extra ==" in r:
      extras.setdefault(r.split('extra == "')[1].rstrip('"'), []).append(r.split(";")[0].strip())
  assert set(extras) == {"train", "tpu", "cuda", "compile", "wandb"}
  with open(os.path.join(REPO_ROOT, "requirements.txt"), encoding="utf-8") as f:
    wanted = [l.split("#", 1)[0].strip() for l in f if l.split("#", 1)[0].strip()]
  assert extras["train"] == wanted  # [train] is what README command 1 installs
  assert extras["tpu"] == extras["compile"] == ["jax[tpu]==0.10.2"]  # libtpu 0.0.42.*, the compile helper's pin
  assert extras["cuda"] == ["jax[cuda12]>=0.10.2"]
  for command in ("train", "score", "generate", "export", "assets"):
    assert f"tregjax-{command} = tregjax.scripts:{command}" in scripts


def test_losses_readme_snippet_runs_from_the_wheel_with_only_jax_and_numpy(wheel, tmp_path):
  import readme_test  # the README's loss snippet, as the README test reads it
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
  python = venv / "bin" / "python"
  proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                         "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Exactly jax's and numpy's run-time closure, linked from this interpreter's installation.
  deps = tmp_path / "deps"
  deps.mkdir()
  closure = _closure(["jax", "numpy"])
  assert {"jax", "jaxlib", "numpy", "ml-dtypes", "scipy", "opt-einsum"} <= closure and "flax" not in closure
  for name in closure:
    dist = importlib.metadata.distribution(name)
    for top in {str(f).split("/")[0] for f in dist.files if not str(f).startswith("..")}:
      target = dist.locate_file(top)
      if os.path.exists(target) and not (deps / top).exists() and top != "__pycache__":
        os.symlink(target, deps / top)
  site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                        text=True, check=True).stdout.strip()
  with open(os.path.join(site, "tregjax_test_deps.pth"), "w", encoding="utf-8") as f:
    f.write(str(deps) + "\n")
  code = readme_test.losses_snippet() + "\nimport sys\nassert 'flax' not in sys.modules and 'transformers' not in " \
      "sys.modules\nimport tregjax\nprint('from', tregjax.__file__)\n"
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"from {site}" in proc.stdout  # the installed wheel, not the checkout
  assert "loss/total" in proc.stdout
  for banned in ("flax", "transformers", "absl"):  # the venv really lacks what only [train] brings
    assert subprocess.run([str(python), "-c", f"import {banned}"], capture_output=True, env=env).returncode != 0
  # A console script without [train]: one line naming the missing package and the extra that brings it.
  proc = subprocess.run([str(venv / "bin" / "tregjax-train"), "--help"], capture_output=True, text=True, env=env,
                        timeout=120, cwd=tmp_path)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert proc.stderr.strip().startswith("tregjax-train: error: the Python package") and \
      "pip install 'tregjax[train]'" in proc.stderr and "Traceback" not in proc.stderr
