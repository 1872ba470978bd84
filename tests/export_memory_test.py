"""Peak host RSS of `python -m tregjax.export` (the kernel's own counter: ru_maxrss of the export process, from
wait4) is at most 1.5x the bytes it writes, on a 16-layer Llama of width 1024 (about 560 MiB written in bfloat16) whose checkpoint
is laid out as the trainer writes it (float32 params + both Adam moments, stacked leaves one layer per chunk;
`train_common.synthetic_run`); and
transformers loads the result with the checkpoint's values (a golden computed here from the saved float32 arrays:
HF layout by hand, numpy's bfloat16 rounding). bench/export_memory.py measures the variants this bound rests on.
"""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import train_common as tc  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 layers: about 560 MiB of bfloat16. The bound covers the whole process, interpreter included, whose size depends
# on the environment: with jax[tpu] installed (the test venv) jax's plugin discovery imports libtpu's module even
# under JAX_PLATFORMS=cpu, and the 8-layer export (357 MiB) peaked at 1.59x there against 1.29-1.42x without it.
LAYERS, WIDTH, VOCAB = 16, 1024, 32000
LAYER = 5  # the layer whose tensors are compared

# A run directory as `tregjax.train` leaves it (config.json + the Orbax checkpoint of step 1: float32 params, both Adam
# moments, zero at init, so the 2.2 GB checkpoint compresses and writes fast), plus the golden float32 arrays.
_BUILD = f"""
import sys
import numpy as np
sys.path.insert(0, "tests")
import train_common as tc
from tregjax.training import checkpoint as ckpt_lib
saved = {{}}
save = ckpt_lib.Checkpointer.save
def keep(self, step, state, *a, **k):
  p = state.params
  saved.update(embed=p["model"]["embed_tokens"].value, lm_head=p["lm_head"].value,
               norm=p["model"]["norm"]["scale"].value,
               **{{name: layer[{LAYER}] for name, layer in (
                   ("q", p["model"]["layers"]["attn"]["q_proj"].value),
                   ("o", p["model"]["layers"]["attn"]["o_proj"].value),
                   ("gate", p["model"]["layers"]["mlp"]["gate_proj"].value),
                   ("down", p["model"]["layers"]["mlp"]["down_proj"].value))}})
  return save(self, step, state, *a, **k)
ckpt_lib.Checkpointer.save = keep
tc.synthetic_run(sys.argv[1], {LAYERS}, {WIDTH}, {VOCAB})
np.savez(sys.argv[2], **{{k: np.asarray(v) for k, v in saved.items()}})
"""


# The export runs as the child of a small launcher, not of pytest: a child spawned from a large process (subprocess
# uses vfork) starts in its parent's memory, and Linux records that memory's high-water mark into the child's
# ru_maxrss at exec; from the suite's pytest process (1.8 GiB by then) the export's peak read as 1858 MiB.
_LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
  os.execv(sys.executable, [sys.executable] + sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
  f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _export_peak_rss(workdir: str, out: str, env: dict) -> int:
  """The export command's peak RSS in bytes: ru_maxrss of its process, as the kernel reports it to wait4 (in the
  launcher, a ~10 MiB interpreter, so at most that much of it is the launcher's)."""
  report = out + ".maxrss"
  proc = subprocess.run([sys.executable, "-c", _LAUNCH, report, "-m", "tregjax.export", f"--workdir={workdir}",
                         f"--out={out}"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-4000:]
  with open(report, encoding="ascii") as f:
    return int(f.read()) * 1024  # KiB on Linux


def test_export_peak_rss_is_within_1_5x_of_the_bytes_written_and_transformers_loads_it(tmp_path):
  env = dict(tc.worker_env(cache_dir=None), PYTHONPATH=REPO)
  workdir, golden_path, out = str(tmp_path / "run"), str(tmp_path / "golden.npz"), str(tmp_path / "hf")
  build = subprocess.run([sys.executable, "-c", _BUILD, workdir, golden_path], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-4000:]

  peak = _export_peak_rss(workdir, out, env)
  written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
  assert written > 500 * 2**20
  assert peak <= 1.5 * written, f"peak RSS {peak / 2**20:.0f} MiB for {written / 2**20:.0f} MiB written"

  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
  assert model.dtype == torch.bfloat16  # the run's compute dtype, the default --dtype
  hf = model.state_dict()
  g = dict(np.load(golden_path))
  bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
  layer = f"model.layers.{LAYER}."
  golden = {"model.embed_tokens.weight": g["embed"], "lm_head.weight": g["lm_head"].T,
            "model.norm.weight": g["norm"],
            layer + "self_attn.q_proj.weight": g["q"].reshape(WIDTH, -1).T,  # [D, heads, hd] -> [heads*hd, D]
            layer + "self_attn.o_proj.weight": g["o"].reshape(-1, WIDTH).T,  # [heads, hd, D] -> [D, heads*hd]
            layer + "mlp.gate_proj.weight": g["gate"].T, layer + "mlp.down_proj.weight": g["down"].T}
  for name, want in golden.items():
    np.testing.assert_array_equal(hf[name].float().numpy(), bf16(want), err_msg=name)
