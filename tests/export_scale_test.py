"""Export at scale: only the parameters are restored (never the Adam moments), cast while read, written tensor by
tensor; the workdir and the output may be gs:// (a real GCS JSON-API server on 127.0.0.1); transformers loads the
result with the trained values. `export_rss` measures an export's peak RSS (VmHWM) above its post-import baseline.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gcs_emulator  # noqa: E402
import train_common as tc  # noqa: E402

from tregjax import storage  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ~100M parameters: 200 MB written in bfloat16, a 1.2 GB float32 checkpoint (params + two Adam moments).
MEDIUM = {"model.overrides.vocab_size": 32000, "model.overrides.hidden_size": 768,
          "model.overrides.intermediate_size": 3072, "model.overrides.num_layers": 6, "model.overrides.num_heads": 12,
          "model.overrides.num_kv_heads": 4, "model.overrides.head_dim": 64, "model.overrides.max_position_embeddings": 64}

_MEASURE = textwrap.dedent("""
    import json, sys
    def status(key):
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    from tregjax import export, training, models, storage  # every import the export does, before the baseline
    import jax, jax.numpy as jnp, orbax.checkpoint, tensorstore, transformers, safetensors
    jnp.zeros(1).block_until_ready()
    base = status("VmRSS")
    export.export(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
    print("RSS " + json.dumps({"baseline": base, "peak": status("VmHWM")}))
    """)


def _train(workdir, params_dir, env, **overrides):
  proc = subprocess.run(tc.worker_cmd(workdir, **{"optimizer.schedule": "constant", "checkpoint.every": 1000,
                                                  "params_dir": params_dir, **overrides}),
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tc.parse_summary(proc.stdout)


def export_rss(workdir: str, out: str, dtype: str, env: dict) -> dict:
  """Peak RSS of an export subprocess above its baseline after imports (bytes), and the bytes it wrote."""
  proc = subprocess.run([sys.executable, "-c", _MEASURE, workdir, out, dtype], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rss = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RSS "))[4:])
  written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
  return dict(rss, written=written, increase=rss["peak"] - rss["baseline"])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  em = gcs_emulator.Emulator(str(tmp_path_factory.mktemp("gcs") / "emulator.log"))
  yield em
  em.stop()


def test_export_reads_a_gcs_workdir_and_writes_a_gcs_out_that_transformers_loads(tmp_path, emulator):
  workdir = f"gs://{gcs_emulator.BUCKET}/export-run"
  out = f"gs://{gcs_emulator.BUCKET}/export-out"
  env = dict(tc.worker_env(), **emulator.env())
  _train(workdir, str(tmp_path), env, **{"train.steps": 2})
  log = str(tmp_path / "export.strace")
  proc = subprocess.run(gcs_emulator.strace_prefix(log) + [sys.executable, "-m", "tregjax.export",
                                                           f"--workdir={workdir}", f"--out={out}"],
                        env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert gcs_emulator.off_loopback(log) == []
  local = tmp_path / "downloaded"
  local.mkdir()
  with gcs_emulator.client_environment(emulator):
    names = [n for n in storage.listdir(out) if not storage.is_temporary(n)]
    assert "config.json" in names and "model.safetensors" in names
    for n in names:
      (local / n).write_bytes(storage.read_bytes(storage.join(out, n)))
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(local), local_files_only=True)
  assert model.dtype == torch.float32  # the run's compute dtype (config.model.dtype), the default --dtype
  params = tc.load_params(str(tmp_path / "params_2.npz"))
  embed = next(v for k, v in params.items() if "embed" in k)
  np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), embed)
