"""tregjax.host_memory: a large block allocated and freed every step, as XLA:CPU's temporaries are, stops faulting in
4 KiB at a time.

The golden is the kernel's own minor-fault counter (getrusage, per thread) around writing a 512 MiB block that a
worker thread allocates with posix_memalign (64-byte aligned, as XLA's AlignedMalloc) and frees, six times. With
glibc's defaults each block is mmap'd and unmapped on free: 131,072 faults of 4 KiB per step.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tregjax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 512 << 20
PAGES_4K, PAGES_2M = SIZE // 4096, SIZE // (2 << 20)

PROBE = textwrap.dedent(f"""
  import ctypes, json, os, resource, sys, threading
  SIZE = {SIZE}
  if os.environ.get("PROBE_APPLY"):  # as tregjax's command hook does, before anything else
    sys.path.insert(0, {REPO!r})
    from tregjax import host_memory
    applied = host_memory.apply_for_command(argv=[sys.executable, "-m", "probe"])
  else:
    applied = "not called"
  libc = ctypes.CDLL(None)
  libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
  libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  faults = []

  def worker():
    for _ in range(6):
      p = ctypes.c_void_p()
      assert libc.posix_memalign(ctypes.byref(p), 64, SIZE) == 0
      before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
      libc.memset(p, 1, SIZE)
      faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
      libc.free(p)

  t = threading.Thread(target=worker)
  t.start()
  t.join()
  print(json.dumps(dict(faults=faults, applied=applied, tunables=os.environ.get("GLIBC_TUNABLES", ""),
                        reexec=os.environ.get("TREGJAX_HOST_MALLOC_REEXEC", ""))))
""")


def _probe(tmp_path, mode: str, apply: bool = True) -> dict:
  (tmp_path / "probe.py").write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TREGJAX_HOST_MALLOC_REEXEC")}
  env.update(TREGJAX_HOST_MALLOC=mode, PYTHONPATH=str(tmp_path))
  if apply:
    env["PROBE_APPLY"] = "1"
  out = subprocess.run([sys.executable, "-m", "probe"], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, check=True)
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_system_mode_faults_every_4k_page_in_every_step(tmp_path):
  got = _probe(tmp_path, "system")
  assert got["applied"] == "system" and "hugetlb" not in got["tunables"]
  if host_memory.transparent_hugepages() != "always":  # with THP always on, glibc's blocks get huge pages anyway
    assert min(got["faults"]) >= PAGES_4K * 0.99, got


def test_hugepages_mode_reexecutes_with_the_tunable_and_faults_in_2mib_pages(tmp_path):
  got = _probe(tmp_path, "hugepages")
  if host_memory.with_hugetlb({}) is None:  # no THP, no glibc >= 2.35: the mode must do nothing and say so
    assert got["applied"] == "system" and got["reexec"] == "" and "hugetlb" not in got["tunables"], got
    return
  assert got["reexec"] == "1" and host_memory.HUGETLB_TUNABLE in got["tunables"] and got["applied"] == "hugepages"
  assert max(got["faults"]) <= PAGES_2M * 2, got  # 256 faults of 2 MiB (+ the odd 4 KiB edge), not 131,072


def test_a_bad_mode_is_one_line_and_exit_status_2_from_every_command():
  env = dict(os.environ, TREGJAX_HOST_MALLOC="bogus", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-m", "tregjax.score", "--help"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=REPO, check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "TREGJAX_HOST_MALLOC='bogus'" in lines[0], out.stderr


def test_mode_from_env_names_the_variable():
  assert host_memory.mode_from_env({}) == "hugepages"
  with pytest.raises(ValueError, match="TREGJAX_HOST_MALLOC='big'"):
    host_memory.mode_from_env({"TREGJAX_HOST_MALLOC": "big"})
