"""A real GCS JSON-API server on 127.0.0.1 for the storage tests (gcp-storage-emulator, in memory, with the two API
parts tensorstore needs added: tests/gcs_emulator_server.py), the environment
that points every client at it with a fixed test credential, and a syscall-level record of where a process connects.

Clients and what keeps each one on the loopback:
- gcsfs (etils.epath's gs:// backend, our storage layer and Orbax's metadata): STORAGE_EMULATOR_HOST, and the token
  `anon` (FSSPEC_GCS_TOKEN: no credential lookup at all); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false stops its
  bucket-type probe, which asks the Storage Control gRPC API on storage.googleapis.com.
- tensorstore (Orbax's array writes): TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING, which replaces
  its credential lookup (application default credentials, then the GCE metadata server) with that fixed token.
- anything that would still look for a metadata server: GCE_METADATA_HOST / GCE_METADATA_IP on a closed loopback port.
`connects(log)` reads `strace -e trace=connect` output: the kernel's record of every connect() by the process tree,
Python sockets and C++ libraries (tensorstore's curl) alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "tregjax-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(endpoint: str) -> dict[str, str]:
  """Environment that sends every GCS client of a process to `endpoint` with a fixed test credential."""
  return {
      "STORAGE_EMULATOR_HOST": endpoint,
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": endpoint,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "tregjax-test-token",
      "GOOGLE_CLOUD_PROJECT": "tregjax-test",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
      "NO_GCE_CHECK": "True",
  }


class Emulator:
  """The emulator server on 127.0.0.1 (in memory), with BUCKET created; stop() ends it."""

  def __init__(self, log_path: str):
    self.port = free_port()
    self.endpoint = f"http://127.0.0.1:{self.port}"
    server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")
    self._log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen([sys.executable, server, str(self.port), BUCKET], stdout=self._log,
                                 stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
      try:
        with urllib.request.urlopen(self.endpoint + "/", timeout=1) as r:  # the emulator's health check
          if r.read() == b"OK":
            break
      except OSError:
        pass
      if self.proc.poll() is not None or time.time() - t0 > 60:
        raise RuntimeError(f"the GCS emulator did not start (exit {self.proc.poll()}); see {log_path}")
      time.sleep(0.1)

  def env(self) -> dict[str, str]:
    return client_env(self.endpoint)

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self._log.close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """One emulator per test module (import this fixture by name)."""
  em = Emulator(str(tmp_path_factory.mktemp("gcs") / "emulator.log"))
  yield em
  em.stop()


@contextlib.contextmanager
def client_environment(emulator: Emulator):
  """This process's GCS clients point at `emulator` inside the block (fresh gcsfs instances on entry and exit)."""
  saved = {k: os.environ.get(k) for k in emulator.env()}
  os.environ.update(emulator.env())
  _forget_filesystems()
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _forget_filesystems()


def _forget_filesystems() -> None:
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.pop("gcs", None)
  fsspec.config.set_conf_env(fsspec.config.conf)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


def strace_prefix(log_path: str) -> list[str]:
  """Run a command under strace, recording every connect() of it and its threads/children into `log_path`."""
  exe = shutil.which("strace")
  if exe is None:
    raise AssertionError("the loopback audit needs strace (apt-get install strace)")
  return [exe, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-e", "signal=none", "-o", log_path]


_FAMILY = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)")
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
_V4 = re.compile(r'inet_addr\("([^"]+)"\)')
_V6 = re.compile(r'inet_pton\(AF_INET6, "([^"]+)"')
_LOCAL_FAMILIES = ("AF_UNIX", "AF_UNSPEC", "AF_NETLINK")  # a local socket, or an unconnect of a UDP socket


def connects(log_path: str) -> list[tuple[str, str]]:
  """(family, address) of every connect() in an strace log: ('AF_INET', '127.0.0.1:8080'), ('AF_UNIX', '')."""
  out = []
  with open(log_path, encoding="utf-8") as f:
    for line in f:
      m = _FAMILY.search(line)
      if m is None:
        if "connect(" in line:
          out.append(("UNPARSED", line.strip()))
        continue
      family = m.group(1)
      host = _V4.search(line) or _V6.search(line)
      port = _PORT.search(line)
      out.append((family, f"{host.group(1) if host else '?'}:{port.group(1) if port else '?'}"
                  if family in ("AF_INET", "AF_INET6") else ""))
  return out


def off_loopback(log_path: str) -> list[tuple[str, str]]:
  """The connects of `connects(log_path)` that leave the machine's loopback (a local socket family is local)."""
  bad = []
  for family, addr in connects(log_path):
    host = addr.rsplit(":", 1)[0]
    if family in _LOCAL_FAMILIES or (family == "AF_INET" and host.startswith("127.")) or (
        family == "AF_INET6" and host in ("::1", "::ffff:127.0.0.1")):
      continue
    bad.append((family, addr))
  return bad
