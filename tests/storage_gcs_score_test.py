"""A scored cache on gs:// (a real GCS JSON-API server on 127.0.0.1, tests/gcs_emulator.py): `tregjax.score` scores in
a local staging directory and uploads the cache with its marker last; the trainer, given the gs:// cache_dir, checks
the marker and hash, copies the cache down and trains on it. A torn upload (no marker) is never read as whole.

Goldens: the same config scored into a local cache_dir (the uploaded objects and the trainer's copy must be its bytes,
file for file), and a training run on that local cache (the gs:// run's losses and parameters must be its bits).
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch

torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
import gcs_emulator  # noqa: E402
from gcs_emulator import emulator  # noqa: F401  (the module's emulator fixture)
import train_common as tc  # noqa: E402

from tregjax import errors, storage, training  # noqa: E402
from tregjax.data import scored_cache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
URI = f"gs://{gcs_emulator.BUCKET}/scored"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  tok = dc.byte_level_bpe(str(root / "tok"))
  torch.manual_seed(0)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  vocab = len(AutoTokenizer.from_pretrained(tok))
  model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       pad_token_id=0)).eval()
  model.save_pretrained(str(root / "ref"))
  AutoTokenizer.from_pretrained(tok).save_pretrained(str(root / "ref"))
  dc.write_jsonl(str(root / "a.jsonl"), dc.pair_records(6, seed=3))
  return root


OVERRIDES = {"model.preset": "", "train.steps": 2, "checkpoint.every": 100, "checkpoint.async_save": False,
             "data.batch_size": 2, "data.buckets": (128,), "data.max_prompt_length": 64, "data.max_length": 128,
             "data.eval_split": ""}
SCORE = dict(batch_size=16, shard_size=3, buckets=(64, 128), progress_bar=False)

# One worker process (one interpreter start, one compilation cache: the second scoring and the second training hit
# it) does what a user's commands do: score into a local cache (the golden), score into gs:// (staged on the
# "score host"), train from the gs:// cache (copied down on the "train host"), train from the local cache.
WORKER = """
import os, sys
sys.path.insert(0, {tests!r})
import ml_collections
import train_common as tc
from tregjax import score, training

def config(cache_dir, train_files):
  c = tc.tiny_config(**{overrides!r}, **{{"model.hf_path": {ref!r}, "data.dataset_dir": {ds!r},
                                         "data.cache_dir": cache_dir}})
  c.model.overrides = ml_collections.ConfigDict()
  c.data.train_files = [{data!r}] if train_files else []  # without: train on what data.cache_dir holds
  c.score.update({score!r})
  c.score.token_reward.source = "confidence"
  return c

out = {out!r}
score.run(config(os.path.join(out, "golden"), True))
os.environ["TREGJAX_STAGING_DIR"] = os.path.join(out, "score_host")
assert score.run(config({uri!r}, True)) == {uri!r}
os.environ["TREGJAX_STAGING_DIR"] = os.path.join(out, "train_host")
training.run(config({uri!r}, False), os.path.join(out, "run_gcs"))
training.run(config(os.path.join(out, "golden"), False), os.path.join(out, "run_local"))
"""


def _config(world, cache_dir: str) -> ml_collections.ConfigDict:
  c = tc.tiny_config(**OVERRIDES, **{"model.hf_path": str(world / "ref"), "data.cache_dir": cache_dir})
  c.model.overrides = ml_collections.ConfigDict()
  c.data.train_files = []
  c.score.update(SCORE)
  c.score.token_reward.source = "confidence"
  return c


@pytest.fixture(scope="module")
def runs(world, emulator, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("runs"))
  script = WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)), overrides=OVERRIDES,
                         ref=str(world / "ref"), ds=str(world / "ds"), data=str(world / "a.jsonl"), score=SCORE,
                         out=out, uri=URI)
  strace = os.path.join(out, "worker.strace")
  proc = subprocess.run(gcs_emulator.strace_prefix(strace) + [sys.executable, "-c", script],
                        env=dict(tc.worker_env(), **emulator.env()), cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert gcs_emulator.off_loopback(strace) == []  # every connect() of scoring, upload and training: the loopback
  return out


def _local_tree(root) -> dict[str, bytes]:
  return {name: storage.read_bytes(os.path.join(root, name)) for name in storage.list_files(root, ("work",))}


def _remote_tree(uri) -> dict[str, bytes]:
  return {name: storage.read_bytes(storage.join(uri, name)) for name in storage.list_files(uri)}


def _params(workdir) -> dict[str, np.ndarray]:
  """The final checkpoint's arrays, restored by Orbax without a target (as saved)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(step), "state"))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_score_uploads_to_gcs_with_the_marker_last_and_train_reads_it(runs, emulator):
  golden = _local_tree(os.path.join(runs, "golden"))
  with gcs_emulator.client_environment(emulator):
    uploaded = _remote_tree(URI)
  assert uploaded == golden  # every object of the local cache, byte for byte, and nothing else (no work shards)
  digest = json.loads(uploaded[scored_cache.CACHE_META])["hash"]
  # the scoring host keeps its finished copy under the cache's hash (work shards dropped), for a trainer there;
  # the training host copied the cache down (marker and hash checked, marker last) and left no temporary
  for host in ("score_host", "train_host"):
    assert os.listdir(os.path.join(runs, host)) == [f"cache-{digest[:16]}"], host
    assert _local_tree(os.path.join(runs, host, f"cache-{digest[:16]}")) == golden, host
  # the run on the gs:// cache is the run on the local cache, bit for bit
  run_gcs, run_local = os.path.join(runs, "run_gcs"), os.path.join(runs, "run_local")
  want, got = tc.metrics_by_step(run_local), tc.metrics_by_step(run_gcs)
  assert sorted(got) == sorted(want) == [1, 2]
  assert [got[s]["loss/total"] for s in got] == [want[s]["loss/total"] for s in got]
  a, b = _params(run_gcs), _params(run_local)
  assert a and sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_torn_upload_without_its_marker_is_never_read_as_whole(runs, world, emulator, tmp_path, monkeypatch):
  torn = f"gs://{gcs_emulator.BUCKET}/torn"
  monkeypatch.setenv("TREGJAX_STAGING_DIR", str(tmp_path / "stage"))
  files = _local_tree(os.path.join(runs, "golden"))
  with gcs_emulator.client_environment(emulator):
    for name, data in files.items():  # an upload killed just before its last object: the marker
      if name != scored_cache.CACHE_META:
        storage.write_bytes(storage.join(torn, name), data)
    with pytest.raises(errors.StaleCacheError, match=rf"^{torn} is not a finished scored cache \(no cache_meta.json\)"):
      scored_cache.local_copy(torn)
    with pytest.raises(errors.StaleCacheError, match=rf"^{torn} is not a finished scored cache"):
      training.run(_config(world, torn), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "stage")  # nothing was copied down
    # once the marker arrives (last, as the scorer uploads it) the cache is read, whole
    storage.write_bytes(storage.join(torn, scored_cache.CACHE_META), files[scored_cache.CACHE_META])
    assert _local_tree(scored_cache.local_copy(torn)) == files
