"""A LoRA run (with adapter dropout, whose masks come from the step's key) resumes bitwise after SIGKILL, and follows
the 1-device trajectory on a 4-device fsdp=2 x tensor=2 mesh.

Subprocess workers (tests/train_common.py) as in train_resume_test / train_mesh_test. Mesh tolerance: rtol 1e-5 /
atol 1e-6 on float32 losses and adapters, the full run's (sharded reductions reorder float32 sums by a few ulps).
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_common as tc
from train_resume_test import _complete_steps, _wait_for

pytestmark = pytest.mark.filterwarnings("ignore")
LORA = {"optimizer.schedule": "constant", "checkpoint.every": 2, "checkpoint.async_save": True,
        "model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.1,
        "model.frozen_param_dtype": "bfloat16"}


def _run(workdir, **overrides):
  proc = subprocess.run(tc.worker_cmd(workdir, **{**LORA, **overrides}), env=tc.worker_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tc.parse_summary(proc.stdout)


def test_lora_sigkill_then_resume_is_bitwise_a_straight_run(tmp_path):
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(tc.worker_cmd(killed, **{**LORA, "train.steps": 1000}), env=tc.worker_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: any(s >= 4 for s in _complete_steps(killed)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = max(_complete_steps(killed))
  total = resumed_from + 3
  resumed = _run(killed, **{"train.steps": total})
  assert resumed["start_step"] == resumed_from and resumed["step"] == total
  straight_dir = str(tmp_path / "straight")
  _run(straight_dir, **{"train.steps": total})
  a = tc.load_params(os.path.join(killed, f"params_{total}.npz"))
  assert a and all("_lora" in k for k in a)  # the saved trainable params are the adapters only
  tc.assert_params_bitwise_equal(os.path.join(killed, f"params_{total}.npz"),
                                 os.path.join(straight_dir, f"params_{total}.npz"))
  fa, fb = tc.metrics_by_step(killed), tc.metrics_by_step(straight_dir)
  assert [fa[s]["loss/total"] for s in range(1, total + 1)] == [fb[s]["loss/total"] for s in range(1, total + 1)]


SCRIPT = r"""
import json, os, sys
import numpy as np
import jax
import train_common as tc
from tregjax import training

out = {}
for name, mesh in json.loads(sys.argv[2]):
  config = tc.tiny_config(**{"optimizer.schedule": "constant", "train.steps": 5, "model.lora.rank": 4,
                             "model.lora.alpha": 8.0, "model.lora.dropout": 0.1})
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  workdir = os.path.join(sys.argv[1], name)
  summary = training.run(config, workdir, data_factory=tc.array_data)
  recs = tc.metrics_by_step(workdir)
  flat = jax.tree_util.tree_flatten_with_path(summary.state.params)[0]
  out[name] = {"loss": [recs[s]["loss/total"] for s in sorted(recs)],
               "params": {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)).tolist() for p, v in flat},
               "shards": {jax.tree_util.keystr(p): list(v.sharding.shard_shape(v.shape)) for p, v in flat}}
print("RESULT " + json.dumps(out))
"""


def _devices_run(tmp_path, num_devices, runs):
  env = tc.worker_env(num_devices=num_devices)
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(runs)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def test_lora_fsdp2_tensor2_follows_the_one_device_trajectory(tmp_path):
  single = _devices_run(tmp_path / "one", 1, [["single", [1, 1, 1]]])["single"]
  sharded = _devices_run(tmp_path / "four", 4, [["fsdp2_tp2", [1, 2, 2]]])["fsdp2_tp2"]
  assert len(single["loss"]) == 5
  np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5, atol=1e-6)
  for k, v in single["params"].items():
    np.testing.assert_allclose(np.asarray(sharded["params"][k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
  # The adapters shard under the base's rules: q_proj's A [L=2, embed=32, r=4] over fsdp on embed, its B
  # [L, r, heads=2, head_dim=16] over tensor on heads; down_proj's A [L, mlp=64, r] over tensor on mlp.
  q = "['model']['layers']['attn']['q_proj_lora']"
  assert sharded["shards"][q + "['lora_a'].value"] == [2, 16, 4]
  assert sharded["shards"][q + "['lora_b'].value"] == [2, 4, 1, 16]
  assert sharded["shards"]["['model']['layers']['mlp']['down_proj_lora']['lora_a'].value"] == [2, 32, 4]
