"""Parallelism is configuration: dp=4, fsdp=4 and fsdp=2×tensor=2 on 4 fake CPU devices follow the 1-device loss
trajectory, and a checkpoint written on one mesh resumes on another.

Tolerance: rtol 1e-5 / atol 1e-6 on float32 losses and parameters. Sharded runs reorder float32 reductions (the
batch mean across devices, the FSDP/tensor-parallel matmul partial sums), which moves results by a few ulps per op;
five Adam steps at lr 1e-3 keep that below 1e-5 relative. A real sharding bug (a wrong axis, a missing psum) changes
the loss in the 2nd-3rd significant digit.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_common as tc

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = r"""
import json, os, sys
import numpy as np
import jax
import train_common as tc
from tregjax import training

out = {}
root = sys.argv[1]
for name, mesh, steps, src in json.loads(sys.argv[2]):
  config = tc.tiny_config(**{"optimizer.schedule": "constant", "train.steps": steps, "checkpoint.every": 4})
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  workdir = os.path.join(root, src or name)
  summary = training.run(config, workdir, data_factory=tc.array_data)
  recs = tc.metrics_by_step(workdir)
  params = jax.device_get(summary.state.params)
  flat = {jax.tree_util.keystr(p): np.asarray(v).tolist()
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  shardings = {jax.tree_util.keystr(p): list(v.sharding.shard_shape(v.shape))
               for p, v in jax.tree_util.tree_flatten_with_path(summary.state.params)[0]}
  out[name] = {"loss": [recs[s]["loss/total"] for s in sorted(recs)], "start": summary.start_step,
               "params": flat, "shardings": shardings, "devices": jax.device_count()}
print("RESULT " + json.dumps(out))
"""


def _run(tmp_path, num_devices, runs):
  env = tc.worker_env(num_devices=num_devices)
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(runs)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_dp_fsdp_and_tensor_meshes_match_one_device(tmp_path):
  single = _run(tmp_path / "one", 1, [["single", [1, 1, 1], 7, None]])["single"]
  sharded = _run(tmp_path / "four", 4, [
      ["dp4", [4, 1, 1], 5, None],
      ["fsdp4", [1, 4, 1], 5, None],
      ["fsdp2_tp2", [1, 2, 2], 5, None],
      # the fsdp=4 run's checkpoint (step 4, then 5) resumed on another mesh: 2 more steps.
      ["fsdp4_to_dp2_tp2", [2, 1, 2], 7, "fsdp4"],
  ])
  assert single["devices"] == 1 and len(single["loss"]) == 7
  for name in ("dp4", "fsdp4", "fsdp2_tp2"):
    run = sharded[name]
    assert run["devices"] == 4
    np.testing.assert_allclose(run["loss"], single["loss"][:5], rtol=1e-5, atol=1e-6, err_msg=name)
  # The meshes really shard: FSDP splits the embed axis of down_proj [L=2, mlp=64, embed=32], tensor parallelism its
  # mlp axis; pure data parallelism replicates it.
  down = "['model']['layers']['mlp']['down_proj'].value"
  assert sharded["fsdp4"]["shardings"][down] == [2, 64, 8]
  assert sharded["fsdp2_tp2"]["shardings"][down] == [2, 32, 16]
  assert sharded["dp4"]["shardings"][down] == [2, 64, 32]

  resumed = sharded["fsdp4_to_dp2_tp2"]
  assert resumed["start"] == 5
  np.testing.assert_allclose(resumed["loss"], single["loss"], rtol=1e-5, atol=1e-6)
  for k, v in single["params"].items():
    np.testing.assert_allclose(np.asarray(resumed["params"][k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
