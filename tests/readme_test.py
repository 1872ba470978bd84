"""The README's promises: the two set-up commands come first, and its losses snippet runs as written."""

import os
import re

from conftest import REPO_ROOT


def _readme() -> str:
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def test_readme_opens_with_the_two_commands():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).strip().splitlines()
  assert first_block == [
      "pip install -r requirements.txt && python -m tregjax.train --config configs/demo.py",
      "pip install -r requirements-test.txt && python -m pytest -q",
  ]


def losses_snippet() -> str:
  section = _readme().split("## Use the losses in your own JAX code", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_losses_snippet_runs_and_gives_a_finite_loss(capsys):
  code = losses_snippet()
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  import numpy as np
  assert np.isfinite(float(namespace["loss"]))
  assert set(namespace["metrics"]) >= {"loss/total", "loss/regularizer", "weight/mean", "rewards/accuracy"}
