"""requirements.txt covers what tregjax imports, and a missing package is one line, not a traceback.

The runtime venv step of .ci/run (requirements.txt alone, every command run) catches packages reached only through a
code path of another library (jinja2 via transformers' chat templates); this test catches the direct imports.
"""

import ast
import logging
import os
import re
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

from tregjax import cli


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _required() -> set[str]:
  names = set()
  with open(os.path.join(REPO_ROOT, "requirements.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line and not line.startswith("-"):
        names.add(_normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
  return names


def _optional() -> set[str]:
  """Distributions of the optional extras other than [train] (pyproject: wandb's logging hook), which tregjax imports
  only when a config asks for them, with a one-line error naming the extra when they are missing."""
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
  names = set()
  for extra, spec in extras.items():
    if extra == "train":
      continue
    for path in spec["file"]:
      with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        names |= {_normalise(re.split(r"[<>=!~\[; ]", l.split("#", 1)[0].strip(), maxsplit=1)[0])
                  for l in f if l.split("#", 1)[0].strip()}
  return names


def _third_party_imports() -> dict[str, str]:
  """Top-level module -> the first file importing it, over every module under tregjax/ (function-level imports too)."""
  found = {}
  for root, _, files in os.walk(os.path.join(REPO_ROOT, "tregjax")):
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          modules = [node.module]
        else:
          continue
        for module in modules:
          top = module.split(".")[0]
          if top not in sys.stdlib_module_names and top not in ("tregjax", "__future__"):
            found.setdefault(top, os.path.relpath(path, REPO_ROOT))
  return found


def test_every_third_party_import_is_in_requirements():
  imports = _third_party_imports()
  assert {"jax", "flax", "transformers", "absl", "orbax"} <= set(imports)  # the scan sees the real imports
  missing = {f"{top} (distribution {cli.distribution_of(top)}, imported in {where})"
             for top, where in imports.items()
             if _normalise(cli.distribution_of(top)) not in _required() | _optional()}
  assert not missing, f"requirements.txt lacks: {sorted(missing)}"


def test_runtime_never_imports_torch():
  assert "torch" not in _third_party_imports()


def test_missing_package_names_the_distribution():
  assert cli.missing_package(ModuleNotFoundError("No module named 'absl'", name="absl.flags")) == "absl-py"
  assert cli.missing_package(ModuleNotFoundError("x", name="jinja2")) == "jinja2"
  # transformers raises a plain ImportError naming the package in its message (no `name`):
  error = ImportError("apply_chat_template requires jinja2 to be installed. Please install it using `pip install "
                      "jinja2`.")
  assert cli.missing_package(error) == "jinja2"
  assert "pip install -r requirements.txt" in cli.missing_package_message("python -m tregjax.train", error)
  # A broken import inside tregjax is a bug, not the environment: no "install tregjax" advice.
  assert cli.missing_package(ImportError("cannot import name 'x'", name="tregjax.losses")) is None
  assert cli.missing_package(ImportError("something else entirely")) is None


def test_torch_banner_is_dropped_and_other_transformers_warnings_kept():
  previous_hook = sys.excepthook
  cli.install_command_hooks("test")
  seen: list[logging.LogRecord] = []

  class _Collect(logging.Handler):
    def emit(self, record):
      seen.append(record)

  logger = logging.getLogger("transformers")
  # A handler on the logger itself, where the command hook's filter sits: whether transformers (imported by another
  # test or not) has stopped the logger propagating to the root no longer decides how many copies arrive.
  handler = _Collect(level=logging.WARNING)
  previous_level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.WARNING)
  try:
    logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                   "file/data utilities can be used.")
    logger.warning("a real warning")
    assert [r.getMessage() for r in seen] == ["a real warning"]
  finally:
    sys.excepthook = previous_hook
    logger.removeHandler(handler)
    logger.setLevel(previous_level)
    logger.filters = [f for f in logger.filters if type(f).__name__ != "_DropTorchBanner"]


def test_command_with_a_missing_package_exits_3_with_one_line(tmp_path):
  """`python -m tregjax.train` where absl cannot be imported (hidden by a meta-path finder): one line naming absl-py and
  requirements.txt, exit status 3, no traceback. The import fails at module level, before the command's main."""
  (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
      import sys
      class _Hide:
        def find_spec(self, name, path=None, target=None):
          if name == "absl" or name.startswith("absl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
          return None
      sys.meta_path.insert(0, _Hide())
      """))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO_ROOT]))
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", "configs/demo.py"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == cli.EXIT_MISSING_PACKAGE, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines == ["python -m tregjax.train: error: the Python package 'absl-py' is not installed; "
                   "`pip install -r requirements.txt` (in the tregjax checkout) or `pip install 'tregjax[train]'` "
                   "installs it"], proc.stderr[-3000:]
