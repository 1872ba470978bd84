"""tregjax: preference optimization with token-level reward regularization (T-REG) in JAX/Flax NNX.

Submodules are imported lazily so that `from tregjax import losses` pulls in nothing but jax. Importing the package
has no side effect: a command (`python -m tregjax.X`) installs its hooks from its own first lines
(`cli.install_command_hooks`).
"""

import importlib

__all__ = ["losses", "models", "data", "training", "parallel"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'tregjax' has no attribute {name!r}")
