"""tregjax.host_memory: a large block allocated and freed every step, as XLA:CPU's temporaries are, stops faulting in
4 KiB at a time.

The golden is the kernel's own minor-fault counter (getrusage, per thread) around writing a 512 MiB block that a
worker thread allocates with posix_memalign (64-byte aligned, as XLA's AlignedMalloc) and frees, six times. With
glibc's defaults each block is mmap'd and unmapped on free: 131,072 faults of 4 KiB per step.
"""

import ast
import json
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
  with open("starts.txt", "a") as f:  # one line per start: a re-execution starts the probe again
    f.write("start\\n")
  if os.environ.get("PROBE_APPLY"):  # as tregjax's command hook does, before anything else
    sys.path.insert(0, {REPO!r})
    from tregjax import host_memory
    applied = host_memory.apply_for_command(
        argv=None if os.environ["PROBE_APPLY"] == "script" else [sys.executable, "-m", "probe"])
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


def _probe(tmp_path, mode: str, apply: bool = True, **inherited: str) -> dict:
  (tmp_path / "probe.py").write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "TREGJAX_HOST_MALLOC"))}
  env.update(TREGJAX_HOST_MALLOC=mode, PYTHONPATH=str(tmp_path), **inherited)
  if apply:
    env["PROBE_APPLY"] = "1"
  out = subprocess.run([sys.executable, "-m", "probe"], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  got["starts"] = len((tmp_path / "starts.txt").read_text().splitlines())
  return got


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


def test_a_console_script_reexecutes_as_python_m_does(tmp_path):
  """`tregjax-train` (a console script: the interpreter runs the script file, no -m) re-executes once with the
  tunable too, with its own command line."""
  (tmp_path / "tregjax-probe").write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "TREGJAX_HOST_MALLOC"))}
  env.update(TREGJAX_HOST_MALLOC="hugepages", PROBE_APPLY="script")
  out = subprocess.run([sys.executable, str(tmp_path / "tregjax-probe")], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  starts = len((tmp_path / "starts.txt").read_text().splitlines())
  if host_memory.with_hugetlb({}) is None:
    assert (got["applied"], starts) == ("system", 1), got
  else:
    assert (got["applied"], got["reexec"], starts) == ("hugepages", "1", 2), got
    assert host_memory.HUGETLB_TUNABLE in got["tunables"]


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


def test_system_mode_clears_the_tunable_a_parent_tregjax_command_added_and_keeps_the_rest(tmp_path):
  """A command run with TREGJAX_HOST_MALLOC=system from a tregjax command that applied hugepages inherits its
  GLIBC_TUNABLES (and the marker of its re-execution): it drops the hugetlb tunable, keeps the user's other tunables,
  and re-executes once so that it really starts with glibc's defaults."""
  got = _probe(tmp_path, "system", GLIBC_TUNABLES="glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1",
               TREGJAX_HOST_MALLOC_REEXEC="1")
  assert (got["tunables"], got["reexec"], got["applied"], got["starts"]) == ("glibc.malloc.arena_max=4", "", "system",
                                                                            2), got


def test_system_mode_keeps_a_tunable_the_user_set(tmp_path):
  got = _probe(tmp_path, "system", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")  # no marker: the user's own setting
  assert (got["tunables"], got["applied"], got["starts"]) == ("glibc.malloc.hugetlb=1", "system", 1), got


def test_without_hugetlb_drops_only_what_tregjax_added():
  parent = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "TREGJAX_HOST_MALLOC_REEXEC": "1", "HOME": "/h"}
  assert host_memory.without_hugetlb(parent) == {"HOME": "/h"}
  assert host_memory.without_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
  assert host_memory.without_hugetlb({"TREGJAX_HOST_MALLOC_REEXEC": "1"}) is None


def test_in_effect_says_what_the_process_runs_with():
  assert host_memory.in_effect({}) == "system (glibc defaults)"
  assert host_memory.in_effect({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == (
      "hugepages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")
  assert host_memory.in_effect({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
      "system (GLIBC_TUNABLES=glibc.malloc.arena_max=2)")


def test_the_setting_in_effect_is_logged_once(tmp_path):
  """cli.setup_logging (every command calls it) logs the allocator setting; a second call logs nothing new."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "TREGJAX_HOST_MALLOC"))}
  env.update(TREGJAX_HOST_MALLOC="system", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", "from tregjax import cli\ncli.setup_logging()\ncli.setup_logging()\n"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
  lines = [line for line in out.stderr.splitlines() if "host allocator" in line]
  assert len(lines) == 1 and lines[0].endswith(
      "tregjax.host_memory INFO host allocator: system (glibc defaults); TREGJAX_HOST_MALLOC=system"), out.stderr


def test_importing_tregjax_installs_no_command_hook(tmp_path):
  """`python -m pkg.x` where pkg imports tregjax: no excepthook, no re-execution, no cli module loaded (the hooks were
  once installed by tregjax/__init__.py whenever argv[0] was "-m")."""
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("import tregjax\n")
  (tmp_path / "pkg" / "x.py").write_text(
      "import json, os, sys\n"
      "print(json.dumps(dict(hook=sys.excepthook is sys.__excepthook__, cli='tregjax.cli' in sys.modules,\n"
      "                      marker=os.environ.get('TREGJAX_HOST_MALLOC_REEXEC', ''),\n"
      "                      tunables=os.environ.get('GLIBC_TUNABLES', ''))))\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "TREGJAX_HOST_MALLOC"))}
  env.update(PYTHONPATH=f"{tmp_path}:{REPO}")
  out = subprocess.run([sys.executable, "-m", "pkg.x"], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == dict(hook=True, cli=False, marker="", tunables="")


def test_a_command_module_installs_its_hooks_from_its_first_lines():
  """Every command module calls cli.install_command_hooks when run as __main__, before any import
  but tregjax.cli's (standard library only)."""
  for command in ("train", "score", "generate", "export", "compile", "assets"):
    with open(os.path.join(REPO, "tregjax", f"{command}.py"), encoding="utf-8") as f:
      body = ast.parse(f.read()).body
    first_import = next(i for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))
                        and not (getattr(node, "module", "") or "").startswith(("__future__", "tregjax")))
    hooks = [i for i, node in enumerate(body) if isinstance(node, ast.If)
             and ast.unparse(node) == f"if __name__ == '__main__':\n    cli.install_command_hooks('python -m tregjax.{command}')"]
    assert hooks and hooks[0] < first_import, command
