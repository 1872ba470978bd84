"""Two processes of one host (two jax processes per GPU node, say) copying the same gs:// scored cache down at once
(a real GCS JSON-API server on 127.0.0.1, tests/gcs_emulator.py): each copies into its own temporary next to the
destination, one rename wins, the other discards its copy and uses the winner's; neither ever sees a partial copy
or loses the other's. Golden: the objects uploaded (file for file, bytes for bytes)."""

import json
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gcs_emulator  # noqa: E402
from conftest import tree_bytes  # noqa: E402
from gcs_emulator import emulator  # noqa: F401  (the module's emulator fixture)

from tregjax import storage  # noqa: E402
from tregjax.data import scored_cache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
DIGEST = "ab" * 32
FILES = {"train.array_record-00000-of-00001": os.urandom(200_000), "eval.array_record-00000-of-00001": b"eval",
         "sub/features.json": b"{}", scored_cache.CACHE_META: json.dumps({"hash": DIGEST}).encode()}


def _race(uri: str, monkeypatch) -> tuple[list, int]:
  """Two threads call local_copy together; each finishes its whole copy before either renames (a barrier in the copy),
  so both reach the rename: the race at its widest. Returns their results (paths or errors) and the copies made."""
  barrier, copies, real = threading.Barrier(2, timeout=60), [], storage.copy_tree

  def copy_then_wait(*a, **k):
    real(*a, **k)
    copies.append(1)
    barrier.wait()

  monkeypatch.setattr(storage, "copy_tree", copy_then_wait)
  results = [None, None]

  def one(i):
    try:
      results[i] = scored_cache.local_copy(uri)
    except Exception as e:  # pylint: disable=broad-except
      results[i] = e

  threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  monkeypatch.setattr(storage, "copy_tree", real)
  return results, len(copies)


def test_two_processes_copying_one_cache_down_at_once_share_the_winners_copy(emulator, tmp_path,  # noqa: F811
                                                                             monkeypatch):
  uri = f"gs://{gcs_emulator.BUCKET}/race"
  stage = tmp_path / "stage"
  monkeypatch.setenv("TREGJAX_STAGING_DIR", str(stage))
  target = str(stage / f"cache-{DIGEST[:16]}")
  with gcs_emulator.client_environment(emulator):
    for name, data in FILES.items():  # the scorer's upload, marker last
      storage.write_bytes(storage.join(uri, name), data)

    results, copies = _race(uri, monkeypatch)
    assert results == [target, target] and copies == 2
    assert tree_bytes(target) == FILES
    assert os.listdir(stage) == [os.path.basename(target)]  # the loser's copy is gone, no temporary left

    # a stale copy under the same name (another cache's marker): both set it aside, one copy wins, again whole
    storage.write_json(os.path.join(target, scored_cache.CACHE_META), {"hash": "cd" * 32})
    results, copies = _race(uri, monkeypatch)
    assert results == [target, target] and copies == 2
    assert tree_bytes(target) == FILES
    assert os.listdir(stage) == [os.path.basename(target)]

    # a process that comes after the winner copies nothing
    monkeypatch.setattr(storage, "copy_tree", lambda *a, **k: pytest.fail("copied again"))
    assert scored_cache.local_copy(uri) == target
