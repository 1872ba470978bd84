"""A checkpoint written on 4 devices (fsdp=4) restores on 2 (fsdp=2) with every saved array bitwise equal, sharded
over the 2 devices, and training resumes from it: a resumed pod slice need not have the writer's device count.

Golden: the parameters the 4-device run held in memory when it saved (numpy, written by that process itself).
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
from tregjax import parallel, training
from tregjax.training import checkpoint as ckpt_lib, partition, trainer

workdir, out, fsdp, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = tc.tiny_config(**{"optimizer.schedule": "constant", "train.steps": steps, "checkpoint.every": 4})
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, fsdp, 1
flat = lambda tree: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
result = {"devices": jax.device_count()}
if steps == 4:  # the writer: train, keep what it saved
  summary = training.run(config, workdir, data_factory=tc.array_data)
  np.savez(out, **{k: np.asarray(jax.device_get(v)) for k, v in flat(summary.state.params).items()})
else:  # the reader on another device count: restore step 4 explicitly, then resume training from it
  program = trainer.build(config, parallel.make_mesh(1, fsdp, 1))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=4, keep=10, async_save=False)
  state, _, _ = ckpt.restore(4, partition.saved(program.target))
  ckpt.close()
  params = flat(state.params)
  np.savez(out, **{k: np.asarray(jax.device_get(v)) for k, v in params.items()})
  result["shard_devices"] = {k: len(v.sharding.device_set) for k, v in params.items()}
  result["shard_shapes"] = {k: list(v.sharding.shard_shape(v.shape)) for k, v in params.items()}
  summary = training.run(config, workdir, data_factory=tc.array_data)
  result["start"] = summary.start_step
  result["loss"] = [r["loss/total"] for _, r in sorted(tc.metrics_by_step(workdir).items())]
print("RESULT " + json.dumps(result))
"""


def _run(workdir, out, num_devices, fsdp, steps):
  env = tc.worker_env(num_devices=num_devices)
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(out), str(fsdp), str(steps)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def test_a_checkpoint_saved_on_4_devices_restores_and_resumes_on_2(tmp_path):
  workdir = tmp_path / "run"
  wrote = _run(workdir, tmp_path / "saved.npz", 4, 4, 4)
  assert wrote["devices"] == 4
  read = _run(workdir, tmp_path / "restored.npz", 2, 2, 6)
  assert read["devices"] == 2
  saved, restored = np.load(tmp_path / "saved.npz"), np.load(tmp_path / "restored.npz")
  assert sorted(saved.files) == sorted(restored.files) and saved.files
  for k in saved.files:
    np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)
  # Restored onto the 2-device mesh: FSDP splits the embed axis of down_proj [L=2, mlp=64, embed=32] in two.
  down = "['model']['layers']['mlp']['down_proj'].value"
  assert read["shard_devices"][down] == 2 and read["shard_shapes"][down] == [2, 64, 16]
  assert read["start"] == 4
  assert len(read["loss"]) == 6 and all(np.isfinite(read["loss"]))
