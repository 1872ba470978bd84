"""tregjax: preference optimization with token-level reward regularization (T-REG) in JAX/Flax NNX.

Submodules are imported lazily so that `from tregjax import losses` pulls in nothing but jax.
"""

import importlib
import sys

if sys.argv[:1] == ["-m"]:
  # `python -m tregjax.<command>`: while the interpreter imports this package to find the command, argv[0] is still
  # "-m" (a script or `import tregjax` in user code sees another value). Install what the commands share before any
  # third-party import: no torch banner from transformers, one line instead of a traceback for a missing package.
  from tregjax import cli as _cli

  _cli.install_command_hooks("python -m " + (sys.orig_argv[sys.orig_argv.index("-m") + 1]
                                             if "-m" in getattr(sys, "orig_argv", []) else "tregjax"))

__all__ = ["losses", "models", "data", "training", "parallel"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'tregjax' has no attribute {name!r}")
