"""The TPU dress rehearsal (tregjax.compile) on a CPU host: libtpu compiles a small DPO-REG run for v5e:2x2.

Goldens: the parameter count of the model written by hand from its config.json, the FSDP layout it implies, the chip's
HBM from the Cloud TPU docs. The compile runs in its own process (libtpu from requirements-tpu.txt; the TPU_* variables
tregjax.compile sets keep it off any metadata server) under an audit hook that records every socket connect.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

# A small Llama: V=512, d=128, f=256, 2 layers, 4 heads of 32, 2 kv heads, untied head.
V, D, F, L, H, KV, HD = 512, 128, 256, 2, 4, 2, 32
PARAMS = V * D + L * (D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * F + 2 * D) + D + D * V
NORM_PARAMS = L * 2 * D + D  # the "norm" axis replicates
B, T, FSDP = 16, 256, 4

_RUN = textwrap.dedent("""
    import json, runpy, socket, sys
    connects = []
    def hook(event, args):
      if event == "socket.connect":
        connects.append(repr(args[1]))
    sys.addaudithook(hook)
    sys.argv = ["tregjax.compile"] + sys.argv[1:]
    try:
      runpy.run_module("tregjax.compile", run_name="__main__")
    finally:
      print("CONNECTS" + json.dumps(connects), file=sys.stderr)
""")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  root = tmp_path_factory.mktemp("compile")
  model = root / "model"
  model.mkdir()
  (model / "config.json").write_text(json.dumps(dict(
      model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=D, intermediate_size=F,
      num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV, head_dim=HD, max_position_embeddings=512,
      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)))
  config = root / "recipe.py"
  config.write_text(textwrap.dedent(f"""
      from tregjax.training import config as config_lib

      def get_config(arg=None):
        c = config_lib.base_config()
        c.objective = "preference"
        c.model.hf_path = {str(model)!r}
        c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", "full"
        c.loss.loss, c.loss.regularizer, c.loss.alpha = "dpo", "treg", 0.25
        c.data.batch_size, c.data.buckets, c.data.max_prompt_length, c.data.max_length = {B}, (128, {T}), 64, {T}
        c.optimizer.grad_accum_steps = 2
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
        c.train.steps = 10
        return c
  """))
  return str(config)


def _run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=timeout)


def test_small_recipe_compiles_for_v5e_2x2_and_reports_memory(recipe, tmp_path):
  out = tmp_path / "reports.json"
  proc = _run("--config", recipe, "--topology", "v5e:2x2", "--json_out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  train, score = json.loads(out.read_text())

  assert train["program"] == "train step" and train["devices"] == FSDP and train["device_kind"] == "TPU v5 lite"
  assert train["mesh"] == {"data": 1, "fsdp": FSDP, "tensor": 1}
  assert train["hbm_bytes"] == 16 * 2**30 and train["fits"]
  # Arguments: the float32 parameters and both Adam moments, sharded over fsdp (norms replicated), plus the batch's
  # rows of this device; unsharded state alone would be 4x more.
  state = 3 * 4 * ((PARAMS - NORM_PARAMS) // FSDP + NORM_PARAMS)
  batch = (B // FSDP) * (T * 4 * (2 * 5 + 4) + 2 * 4)  # per side 5 [B, T] fields, 4 per-token f32, 2 [B] f32
  arg = train["memory"]["argument_size_in_bytes"]
  assert state + batch <= arg < 3 * 4 * PARAMS, (arg, state + batch)
  assert train["memory"]["alias_size_in_bytes"] >= state  # the state is donated: updated in place
  assert train["total_bytes"] >= arg + train["memory"]["temp_size_in_bytes"] - train["memory"]["alias_size_in_bytes"]
  # FSDP: parameters are all-gathered for the forward, gradients reduced across the fsdp axis.
  assert train["collectives"]["all-gather"] > 0
  assert train["collectives"]["reduce-scatter"] + train["collectives"]["all-reduce"] > 0
  assert train["flops"] > 0 and train["model_flops"] > 0
  assert "train step on v5e:2x2 (4 x TPU v5 lite" in proc.stdout and "fits" in proc.stdout

  # The scoring forward: bf16 weights over one host's 4 chips (fsdp=-1 takes them all), no optimizer state.
  assert score["program"] == "scoring forward" and score["devices"] == FSDP
  assert score["mesh"] == {"data": 1, "fsdp": FSDP, "tensor": 1}
  weights = 2 * ((PARAMS - NORM_PARAMS) // FSDP + NORM_PARAMS)
  assert weights <= score["memory"]["argument_size_in_bytes"] < 2 * PARAMS
  assert score["collectives"]["all-gather"] > 0

  connects = json.loads(proc.stderr.rsplit("CONNECTS", 1)[1].splitlines()[0])
  assert all("127.0.0.1" in c or "localhost" in c or c.startswith("'/") for c in connects), connects


def test_a_step_that_does_not_fit_exits_8_with_one_line(recipe):
  proc = _run("--config", recipe, "--topology", "v5e:2x2", "--what", "score", "--hbm_gib", "0.001")
  assert proc.returncode == 8, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("tregjax.compile: error:")]
  assert len(errors) == 1 and "the scoring forward needs" in errors[0] and "more than the 0.0 GiB" in errors[0]
  assert "DOES NOT FIT" in proc.stdout


def test_unknown_topology_lists_the_known_names(recipe):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", recipe, "--compile_only",
                         "--topology", "v5x:4x4"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("tregjax.train: error: --topology='v5x:4x4': libtpu does not know this topology name")
  for chip in ("v4", "v5e", "v5p", "v6e"):
    assert f" {chip}," in line


def test_missing_libtpu_is_one_line_naming_the_extra(monkeypatch):
  """Without libtpu jax says "TPU support not installed": the command names the requirements file instead (exit 3)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from tregjax import cli, compile as compile_lib  # pylint: disable=import-outside-toplevel
  for name in ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE"):
    monkeypatch.setenv(name, "test")  # restored afterwards (prepare_env only sets what is unset)

  def no_tpu(**_):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

  monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
  monkeypatch.setattr(compile_lib, "_libtpu_installed", lambda: False)
  with pytest.raises(compile_lib.MissingLibtpuError, match="pip install -r requirements-tpu.txt") as e:
    compile_lib.topology_devices("v5e:2x2")
  assert cli.exit_status(e.value) == cli.EXIT_MISSING_PACKAGE == 3
  assert cli.exit_status(compile_lib.DoesNotFitError("x")) == cli.EXIT_DOES_NOT_FIT == 8


def test_lora_step_flops_count_no_weight_gradient_for_the_frozen_base(recipe):
  """The step's model FLOPs (the 'step s at bf16 peak' lower bound): a full fine-tune costs 6 per matmul weight per
  token; a LoRA run's frozen base costs 4 (forward + the input's gradient, no weight gradient), its adapters 6.
  Golden: the weight counts written by hand from config.json and the rank."""
  import runpy  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from tregjax import compile as compile_lib, parallel  # pylint: disable=import-outside-toplevel
  from tregjax.training import trainer  # pylint: disable=import-outside-toplevel
  base = L * (D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * F) + D * V  # every matmul weight (embedding: a gather)
  attention = 12 * L * H * HD * T
  r = 8
  # all_linear: q, k, v, o, gate, up, down each gain A [d_in, r] and B [r, d_out]
  lora = L * r * ((D + H * HD) + 2 * (D + KV * HD) + (H * HD + D) + 2 * (D + F) + (F + D))
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  config = runpy.run_path(recipe)["get_config"]()
  config.mesh.fsdp = 1
  assert compile_lib.train_flops_per_token(trainer.build(config, mesh), T) == 6 * base + attention
  config.model.lora.rank, config.model.lora.targets = r, "all_linear"
  assert compile_lib.train_flops_per_token(trainer.build(config, mesh), T) == 4 * base + 6 * lora + attention
