"""tregjax.storage against a local disk and a real GCS JSON-API server on 127.0.0.1 (tests/gcs_emulator.py): the
atomic write holds when its writer is SIGKILLed at any point, URIs never touch the local disk, a scheme without a
backend and a missing bucket are one line each."""

import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gcs_emulator  # noqa: E402
from gcs_emulator import emulator  # noqa: F401  (the module's emulator fixture)

from tregjax import storage  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gcs(emulator):
  with gcs_emulator.client_environment(emulator):
    yield emulator


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    yield str(tmp_path / "out")
  else:
    em = request.getfixturevalue("emulator")
    with gcs_emulator.client_environment(em):
      yield f"gs://{gcs_emulator.BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def _killed_writer(path: str, data_size: int, point: str, env: dict) -> subprocess.CompletedProcess:
  """A process that overwrites `path` with `data_size` bytes of 'N' through storage.write_bytes and SIGKILLs itself
  at `point`: 'data' (after the first chunk went into the temporary), 'move' (temporary complete, not yet moved)."""
  script = textwrap.dedent(f"""
      import os, signal
      from tregjax import storage
      if {point!r} == "data":
        original = storage._write_chunks
        def dying(f, data, chunk=1 << 16):
          f.write(memoryview(data)[:chunk])
          f.flush()
          os.kill(os.getpid(), signal.SIGKILL)
        storage._write_chunks = dying
      else:
        def dying(tmp, path):
          os.kill(os.getpid(), signal.SIGKILL)
        storage._move_into_place = dying
      storage.write_bytes({path!r}, b"N" * {data_size})
      """)
  return subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("point", ["data", "move"])
def test_a_writer_killed_mid_write_leaves_the_old_contents_whole(root, point, emulator):
  path = storage.join(root, "sub", "blob.bin")
  old = b"O" * 300_000
  storage.write_bytes(path, old)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **emulator.env())
  proc = _killed_writer(path, 3_000_000, point, env)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert storage.read_bytes(path) == old  # never a torn mixture, never the partial new bytes
  names = storage.listdir(storage.join(root, "sub"))
  assert "blob.bin" in names and all(n == "blob.bin" or storage.is_temporary(n) for n in names)
  storage.write_bytes(path, b"new")  # a later writer replaces it whole
  assert storage.read_bytes(path) == b"new"


def test_write_json_text_and_read_back(root):
  storage.write_json(storage.join(root, "a.json"), {"b": 1, "a": [1, 2]})
  assert storage.read_json(storage.join(root, "a.json")) == {"a": [1, 2], "b": 1}
  assert storage.read_text(storage.join(root, "a.json")).endswith("\n")
  assert storage.exists(storage.join(root, "a.json")) and not storage.exists(storage.join(root, "b.json"))
  assert [n for n in storage.listdir(root) if not storage.is_temporary(n)] == ["a.json"]


def test_local_atomic_write_gives_0644(tmp_path):
  path = str(tmp_path / "x.json")
  storage.write_json(path, {})
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_text_log_appends_on_disk_and_rewrites_whole_on_object_storage(root):
  path = storage.join(root, "metrics.jsonl")
  log = storage.TextLog(path)
  log.write('{"step": 1}\n')
  log.flush()
  assert storage.read_text(path) == '{"step": 1}\n'
  log.write('{"step": 2}\n')
  log.close()
  again = storage.TextLog(path)  # a resumed run continues the same file
  again.write('{"step": 3}\n')
  again.close()
  assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_a_uri_never_becomes_a_local_path(tmp_path, gcs, monkeypatch):
  monkeypatch.chdir(tmp_path)
  uri = f"gs://{gcs_emulator.BUCKET}/never-local"
  assert storage.resolve(uri) == uri and storage.join(uri, "a", "b") == uri + "/a/b"
  storage.makedirs(uri)
  storage.write_text(storage.join(uri, "f.txt"), "x")
  storage.check_writable(uri)
  assert os.listdir(tmp_path) == []  # no ./gs:/... directory
  assert storage.read_text(uri + "/f.txt") == "x"


def test_a_scheme_without_backend_names_the_scheme_and_the_package():
  with pytest.raises(storage.MissingBackendError, match=r"s3://b/run: the s3:// scheme needs the s3fs package, "
                     r"which is not installed: pip install s3fs"):
    storage.check_writable("s3://b/run")
  with pytest.raises(storage.MissingBackendError, match=r"no storage backend for the scheme ftp://"):
    storage.write_text("ftp://host/x", "x")


def test_a_missing_bucket_is_one_line_naming_it(gcs):
  with pytest.raises(storage.StorageError, match=r"^workdir gs://no-such-bucket-x/run: the bucket "
                     r"gs://no-such-bucket-x does not exist"):
    storage.check_writable("gs://no-such-bucket-x/run")


def test_an_unwritable_local_directory_is_one_line_naming_it():
  with pytest.raises(storage.StorageError, match=r"^workdir /proc/tregjax-run: not a writable directory"):
    storage.check_writable("/proc/tregjax-run")
