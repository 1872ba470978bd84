"""Host allocator settings for XLA:CPU, whose per-step temporaries otherwise fault in anew every step.

XLA:CPU allocates a step's temporaries as one block (3.7 GiB for a SmolLM2-135M DPO-REG step of 4 pairs x 168 tokens)
with `posix_memalign` from a worker thread. glibc serves a block that large with `mmap` (a thread's arena always maps
blocks above the mmap threshold) and `munmap`s it on free, so every step faults all its pages in again, 4 KiB at a
time: about a million minor faults and 2-3 s of system CPU in a 9-11 s step (measured: bench/train_epoch.py). Modes
(`TREGJAX_HOST_MALLOC`):

  hugepages (default)  glibc's tunable glibc.malloc.hugetlb=1: malloc asks for transparent huge pages on the blocks it
                       maps (madvise MADV_HUGEPAGE), so a step faults 2 MiB at a time (512x fewer faults). Memory is
                       still returned on free. A tunable is read when the process starts, so a `python -m tregjax.X`
                       command re-executes itself once, before any third-party import, with it added to
                       GLIBC_TUNABLES. No effect where transparent huge pages are `never`.
  system               glibc's defaults. A GLIBC_TUNABLES that a parent tregjax command gave this process (the
                       hugetlb tunable, with TREGJAX_HOST_MALLOC_REEXEC=1) is cleared: the tunable is dropped and
                       the command re-executes itself once without it.

Keeping freed memory instead (GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=<bytes>, or the same through mallopt) removes the faults and the zeroing too, and
bench/train_epoch.py measures it; it is not a mode because glibc cannot always reuse a freed 64-byte-aligned block
(posix_memalign asks for the block plus its alignment), so a same-size block with a small allocation after it grows
the heap by a block every step.

Standard library only: each command module's first lines (`tregjax.cli.install_command_hooks`) call
`apply_for_command()` before any third-party import; `cli.setup_logging` logs the mode in effect, once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping, Sequence

ENV = "TREGJAX_HOST_MALLOC"
MODES = ("hugepages", "system")
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
REEXEC = f"{ENV}_REEXEC"  # set by the re-execution that added the tunable: it came from tregjax, not the user
CLEARED = f"{ENV}_CLEARED"  # set by the re-execution that dropped a parent's tunable (system)
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def mode_from_env(env: Mapping[str, str] | None = None) -> str:
  """The requested mode; ValueError naming the variable for anything but hugepages / system."""
  mode = (os.environ if env is None else env).get(ENV, MODES[0])
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: must be one of {', '.join(MODES)} (see tregjax/host_memory.py)")
  return mode


def _glibc() -> ctypes.CDLL | None:
  if platform.system() != "Linux":
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None  # not musl


M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def map_large_blocks(threshold: int = 2**20) -> None:
  """From now on glibc maps every block of `threshold` bytes or more with mmap and unmaps it on free (mallopt
  M_MMAP_THRESHOLD; nothing elsewhere). For a process that frees one large array before making the next (a streamed
  export): glibc's default threshold rises to the size of each large block freed (up to 32 MiB), so the blocks of
  tensor size that follow come from the heap and stay in RSS after they are freed, and malloc_trim does not give
  them back. Measured: bench/export_memory.py."""
  libc = _glibc()
  if libc is not None:
    libc.mallopt(M_MMAP_THRESHOLD, int(threshold))


def transparent_hugepages() -> str:
  """The kernel's THP mode (always / madvise / never), "" when unknown."""
  try:
    with open(_THP, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def _has_hugetlb(env: Mapping[str, str]) -> bool:
  return "glibc.malloc.hugetlb=" in env.get("GLIBC_TUNABLES", "")


def with_hugetlb(env: Mapping[str, str]) -> dict[str, str] | None:
  """`env` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES; None when it is there already or would do nothing."""
  tunables = env.get("GLIBC_TUNABLES", "")
  libc = _glibc()
  if _has_hugetlb(env) or libc is None or transparent_hugepages() not in ("madvise", "always"):
    return None
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  if tuple(int(x) for x in libc.gnu_get_libc_version().decode().split(".")[:2]) < (2, 35):
    return None  # the tunable arrived in glibc 2.35; older ones ignore it
  return dict(env, GLIBC_TUNABLES=f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE)


def without_hugetlb(env: Mapping[str, str]) -> dict[str, str] | None:
  """`env` without the hugetlb tunable a parent tregjax command added (and without its marker); None when there is
  none to clear. A GLIBC_TUNABLES the user set (no marker) is left as it is."""
  if not env.get(REEXEC) or not _has_hugetlb(env):
    return None
  kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
  new_env = {k: v for k, v in env.items() if k not in (REEXEC, "GLIBC_TUNABLES")}
  if kept:
    new_env["GLIBC_TUNABLES"] = ":".join(kept)
  return new_env


def _command_argv() -> list[str]:
  """This process's command line when it is one of tregjax's commands, `python -m tregjax.X` or a console script
  (`tregjax-X`, pyproject's [project.scripts]: the interpreter runs the script file), else [] (pytest, a script)."""
  argv = list(getattr(sys, "orig_argv", []))
  if "-m" in argv[:-1]:
    return argv if argv[argv.index("-m") + 1].startswith("tregjax.") else []
  return argv if len(argv) > 1 and os.path.basename(argv[1]).startswith("tregjax-") else []


def apply_for_command(argv: Sequence[str] | None = None, env: MutableMapping[str, str] | None = None) -> str:
  """Applies the mode for a tregjax command's process (`_command_argv`), re-executing it once when the allocator setting it
  starts with must change (`hugepages` added, or a parent's tunable cleared for `system`); returns the mode now in
  effect ("system" where `hugepages` can do nothing here)."""
  env = os.environ if env is None else env
  mode = mode_from_env(env)
  if mode == "hugepages" and _has_hugetlb(env):
    return "hugepages"
  new_env = with_hugetlb(env) if mode == "hugepages" else without_hugetlb(env)
  argv = _command_argv() if argv is None else list(argv)
  marker = REEXEC if mode == "hugepages" else CLEARED
  if new_env is not None and len(argv) > 1 and sys.executable and not env.get(marker):
    new_env[marker] = "1"  # never twice, whatever the loader did with the variable
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, [sys.executable] + argv[1:], new_env)
    except OSError:  # an interpreter that cannot be executed again (embedded, sandboxed): run as is
      pass
  return "system"


def in_effect(env: Mapping[str, str] | None = None) -> str:
  """The allocator setting this process runs with, in words (read from the environment it started with)."""
  env = os.environ if env is None else env
  tunables = env.get("GLIBC_TUNABLES", "")
  if _has_hugetlb(env):
    return f"hugepages (GLIBC_TUNABLES={tunables})"
  return f"system (GLIBC_TUNABLES={tunables})" if tunables else "system (glibc defaults)"


@functools.cache
def log_in_effect() -> str:
  """Logs the allocator setting in effect and the mode asked for, once per process (every later call does
  nothing); returns the line."""
  line = f"host allocator: {in_effect()}; {ENV}={os.environ.get(ENV, MODES[0])}"
  logging.getLogger("tregjax.host_memory").info(line)
  return line


__all__ = ["CLEARED", "ENV", "HUGETLB_TUNABLE", "MODES", "REEXEC", "apply_for_command", "in_effect", "log_in_effect",
           "map_large_blocks", "mode_from_env", "transparent_hugepages", "with_hugetlb", "without_hugetlb"]
