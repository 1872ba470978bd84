"""Packages whose names are imported on first use (PEP 562), so that importing one light submodule of a package
(`tregjax.data.hashing`, `tregjax.training.config`) does not run its heavy siblings. Standard library only."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def package_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
  """A package's module `__getattr__`: a name of `exports` (name -> the submodule defining it) from that submodule,
  any other name as the submodule of that name, imported now; AttributeError for neither."""

  def getattr_(name: str) -> Any:
    if name in exports:
      return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    try:
      return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{package}.{name}":
        raise
      raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

  return getattr_


__all__ = ["package_getattr"]
