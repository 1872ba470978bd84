"""Every recipe compiled for TPU topologies on this CPU host (tregjax.compile, libtpu): memory per chip, fits or not.

    python bench/compile_recipes.py [--recipes llama3_8b_dpo_reg,...] [--slices named,v5e,v5p] [--max_rss_gib 20]
    python bench/compile_recipes.py --recount_flops     # the kept reports' FLOP column with today's count

Needs libtpu (`pip install -r requirements-tpu.txt`). Each recipe (configs/llama3_8b_dpo_reg.py,
configs/llama3_8b_dpo_reg_lora.py, configs/gemma2_9b_simpo_reg.py) is compiled by the real command,
`python -m tregjax.compile --config configs/<recipe>.py:model=DIR --topology T`, one process per topology, where DIR
holds only the published config.json of Meta-Llama-3-8B-Instruct / gemma-2-9b-it (nothing else is read). Topologies:
the ones the recipes' docstrings name (v5p-16 = v5p:2x2x2, 8 chips), then v5e and v5p slices from 4 chips upwards until
the training step fits (the smallest slice where each fits). A slice with more data-parallel ways than the recipe's
micro-batch divides runs with `optimizer.grad_accum_steps` lowered to batch_size / ways (the column says so); a slice
with more ways than pairs per step is skipped. A `VARIANTS` entry ("<recipe>+<name>") is a recipe with the overrides its
docstring tells a user to pass on some hardware (the LoRA recipe with FSDP on v5e). Results go to
bench/out/compile_recipes.json (kept between runs: a rerun compiles only what is missing, so recipes can be run one
invocation at a time) and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

# The published config.json of each checkpoint (the fields tregjax reads).
LLAMA3_8B_INSTRUCT = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    hidden_act="silu", bos_token_id=128000, eos_token_id=128009, torch_dtype="bfloat16")
GEMMA2_9B_IT = dict(
    model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=256000, hidden_size=3584,
    intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=[1, 107],
    pad_token_id=0, torch_dtype="bfloat16")
RECIPES = {
    "llama3_8b_dpo_reg": LLAMA3_8B_INSTRUCT,
    "llama3_8b_dpo_reg_lora": LLAMA3_8B_INSTRUCT,
    "gemma2_9b_simpo_reg": GEMMA2_9B_IT,
}
# A recipe with the overrides its docstring tells a user to pass on some hardware: "<recipe>+<name>" compiles
# configs/<recipe>.py with these --config flags (its own rows, its own smallest slice).
VARIANTS = {
    # The LoRA recipe's mesh (data=-1) keeps the whole 15 GiB bfloat16 base on every chip: on v5e, FSDP shards it.
    "llama3_8b_dpo_reg_lora+fsdp": ("llama3_8b_dpo_reg_lora", {"mesh.data": 1, "mesh.fsdp": -1}),
}
NAMED = {  # the TPU topologies the recipes' docstrings name
    "llama3_8b_dpo_reg": ["v5p:2x2x2"],
}
SLICES = {
    "v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"],
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4"],
}
OUT = common.OUT_DIR / "compile_recipes.json"


def chips(topology: str) -> int:
  n = 1
  for x in topology.split(":")[1].split("x"):
    n *= int(x)
  return n


def base_recipe(recipe: str) -> tuple[str, dict]:
  """(config file stem, --config overrides) of a recipe or a VARIANTS entry."""
  return VARIANTS.get(recipe, (recipe, {}))


def recipe_settings(recipe: str) -> dict:
  """(batch_size, grad_accum_steps, mesh) of a recipe, read from its config file (with a variant's overrides)."""
  sys.path.insert(0, str(common.REPO))
  import importlib.util  # pylint: disable=g-import-not-at-top
  stem, overrides = base_recipe(recipe)
  spec = importlib.util.spec_from_file_location(stem, common.REPO / "configs" / f"{stem}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return dict(batch=c.data.batch_size, accum=c.optimizer.grad_accum_steps,
              mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))


def compile_one(recipe: str, topology: str, model_dir: str, settings: dict, python: str,
                what: str = "train,score") -> dict:
  """One `python -m tregjax.compile` process: its reports, exit status, wall time and peak RSS."""
  devices = chips(topology) * (2 if topology.startswith(("v2", "v3", "v4")) else 1)
  data, fsdp, tensor = settings["mesh"]
  ways = devices // (tensor if tensor > 0 else 1)
  if ways > settings["batch"]:
    return dict(skipped=f"{ways} data-parallel ways > {settings['batch']} pairs per step")
  accum = settings["accum"]
  if settings["batch"] % (ways * accum):
    accum = settings["batch"] // ways
  flags = [f"--config.optimizer.grad_accum_steps={accum}"] if accum != settings["accum"] else []
  stem, overrides = base_recipe(recipe)
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "reports.json")
    log_path = os.path.join(tmp, "log")
    cmd = [python, "-m", "tregjax.compile", "--config", f"configs/{stem}.py:model={model_dir}", "--topology",
           topology, "--what", what, "--json_out", out, *flags]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
      proc = subprocess.Popen(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=str(common.REPO)))
      _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = open(log_path).read()
    reports = json.load(open(out)) if os.path.exists(out) else []
  rc = os.waitstatus_to_exitcode(status)
  print(f"{recipe} {topology}: rc {rc}, {wall:.0f}s, peak RSS {usage.ru_maxrss / 2**20:.1f} GiB", flush=True)
  print("\n".join(line for line in text.splitlines() if not line.startswith(("WARNING: All log", "I0000"))), flush=True)
  return dict(rc=rc, wall_s=wall, peak_rss_gib=usage.ru_maxrss / 2**20, reports=reports,
              grad_accum_steps=accum, changed_accum=accum != settings["accum"],
              error=[line for line in text.splitlines() if "error" in line.lower() or "failure" in line][-1:])


def recount_flops(results: dict) -> None:
  """Recompute every train report's model FLOPs with `tregjax.compile.train_flops_per_token` (a LoRA run's frozen
  base costs no weight gradient), without compiling: the count is arithmetic on the recipe's model and adapters, and
  a report holds the count of the formula it was compiled with (the full fine-tune's, before #26's fix)."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(common.REPO))
  from tregjax import compile as compile_lib, parallel  # pylint: disable=g-import-not-at-top
  from tregjax.training import metrics, trainer  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    for recipe, by_topology in results.items():
      stem, overrides = base_recipe(recipe)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(RECIPES[stem], f)
      spec = importlib.util.spec_from_file_location(stem, common.REPO / "configs" / f"{stem}.py")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config(f"model={tmp}")
      for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1  # the count does not depend on the mesh
      program = trainer.build(c, parallel.mesh_from_config(c, devices=jax.devices()[:1]))
      t = compile_lib.longest_bucket(c)
      ratio = compile_lib.train_flops_per_token(program, t) / metrics.train_flops_per_token(program.model_cfg, t)
      for r in by_topology.values():
        for x in r.get("reports", []):
          if x["program"] == "train step":
            x.setdefault("model_flops_full_count", x["model_flops"])
            x["model_flops"] = x["model_flops_full_count"] * ratio
      print(f"{recipe}: train step model FLOPs = {ratio:.4f} x the full fine-tune's count", flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--recipes", default=",".join([*RECIPES, *VARIANTS]))
  ap.add_argument("--slices", default="named,v5e,v5p", help="named (the docstrings' topologies), v5e, v5p")
  ap.add_argument("--max_rss_gib", type=float, default=20.0, help="stop when a compile's peak RSS passes this")
  ap.add_argument("--python", default=sys.executable, help="the interpreter with libtpu installed")
  ap.add_argument("--redo", action="store_true", help="recompile what bench/out/compile_recipes.json already holds")
  ap.add_argument("--topologies", default="", help="compile exactly these (comma-separated) instead of --slices")
  ap.add_argument("--what", default="train,score", help="programs to compile (tregjax.compile --what)")
  ap.add_argument("--recount_flops", action="store_true", help="recompute the kept reports' model FLOPs (no "
                  "compiling, no libtpu) and rewrite the table")
  a = ap.parse_args()
  results = json.loads(OUT.read_text()) if OUT.exists() and not a.redo else {}
  if a.recount_flops:
    recount_flops(results)
    common.write_json("compile_recipes", results)
    write_results(results)
    return
  kinds = a.slices.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    for recipe in a.recipes.split(","):
      model_dir = os.path.join(tmp, recipe)
      os.makedirs(model_dir)
      with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(RECIPES[base_recipe(recipe)[0]], f)
      settings = recipe_settings(recipe)
      done = results.setdefault(recipe, {})
      plan = [("named", t) for t in NAMED.get(recipe, []) if "named" in kinds]
      plan += [(k, t) for k in ("v5e", "v5p") if k in kinds for t in SLICES[k]]
      if a.topologies:
        plan = [("given", t) for t in a.topologies.split(",")]
      fitted = set()
      for kind, topology in plan:
        if kind in fitted:
          continue  # the smallest slice of this kind that fits is found
        if topology not in done:
          done[topology] = compile_one(recipe, topology, model_dir, settings, a.python, a.what)
          common.write_json("compile_recipes", results)
        r = done[topology]
        train = [x for x in r.get("reports", []) if x["program"] == "train step"]
        if kind not in ("named", "given") and train and train[0]["fits"]:
          fitted.add(kind)
        if r.get("peak_rss_gib", 0) > a.max_rss_gib:
          print(f"stopping: peak RSS {r['peak_rss_gib']:.1f} GiB > --max_rss_gib {a.max_rss_gib}")
          write_results(results)
          return
  write_results(results)


def write_results(results: dict) -> None:
  gib = 2.0 ** 30
  rows = []
  for recipe, by_topology in results.items():
    for topology, r in sorted(by_topology.items(), key=lambda kv: (kv[0].split(":")[0], chips(kv[0]))):
      if "skipped" in r:
        continue
      reports = {x["program"]: x for x in r.get("reports", [])}
      train, score = reports.get("train step"), reports.get("scoring forward")
      if train is None:
        rows.append([recipe, topology, f"error: {(r.get('error') or ['?'])[0][-120:]}", "", "", "", "", ""])
        continue
      m = train["memory"]
      coll = ", ".join(f"{k} {v}" for k, v in train["collectives"].items() if v)
      memory = (f"{m['argument_size_in_bytes'] / gib:.1f} + {m['temp_size_in_bytes'] / gib:.1f} = "
                f"{train['total_bytes'] / gib:.1f} / {train['hbm_bytes'] / gib:.0f}")
      if train.get("compiler_oom"):
        memory = (f"libtpu refuses: temporaries {train['total_bytes'] / gib:.1f} > {train['hbm_bytes'] / gib:.2f} "
                  f"available")
      score_cell = ""
      if score:
        score_cell = f"{score['total_bytes'] / gib:.1f} ({'fits' if score['fits'] else 'NO'})"
      elif r.get("rc") not in (0, 8):
        score_cell = f"compiler error: {(r.get('error') or ['?'])[0][-90:]}"
      rows.append([
          recipe, topology + (f" (grad_accum {r['grad_accum_steps']})" if r.get("changed_accum") else ""), memory,
          "**yes**" if train["fits"] else "no",
          f"{train['model_flops'] / train['peak_flops']:.2f}", score_cell, coll, f"{r['wall_s']:.0f} s, {r['peak_rss_gib']:.1f} GiB"])
  smallest = []
  for recipe, by_topology in results.items():
    for kind in ("v5e", "v5p"):
      fits = [t for t in SLICES[kind] if any(x["program"] == "train step" and x["fits"]
                                              for x in by_topology.get(t, {}).get("reports", []))]
      tried = [t for t in SLICES[kind] if t in by_topology]
      if tried:
        smallest.append([recipe, kind, fits[0] + f" ({chips(fits[0])} chips)" if fits else
                         f"none of {', '.join(tried)}"])
  text = common.table(["recipe", "topology", "train step GiB per chip: argument + temp = total / HBM", "fits",
                       "step s at bf16 peak", "scoring forward GiB (one host)", "train step collectives (HLO)",
                       "compile process: wall (shared CPU), peak RSS"], rows)
  small = common.table(["recipe", "TPU", "smallest slice where the training step fits"], smallest)
  variants = "; ".join(f"{name}: configs/{stem}.py with " + " ".join(f"--config.{k}={v}" for k, v in overrides.items())
                       for name, (stem, overrides) in VARIANTS.items())
  print(text)
  print(small)
  common.update_results("compile_recipes", (
      f"## Every recipe compiled for TPU topologies on a CPU host (#26)\n\n`python bench/compile_recipes.py` "
      f"({common.today()}, {common.machine()}; libtpu 0.0.42.1, jax 0.10.2). Each row is one "
      f"`python -m tregjax.compile --config configs/<recipe>.py:model=DIR --topology T` (DIR: the checkpoint's "
      f"config.json only): the recipe's real training step (mesh, shardings, full remat, micro-batch; 128 pairs x "
      f"2048 tokens per step) and the scoring forward of one host, compiled by libtpu for the topology; memory is "
      f"XLA's buffer assignment per chip (total = argument + output - aliased + temp + code), HBM from "
      f"training.metrics.ACCELERATORS. 'step s at bf16 peak' = the model's FLOPs per chip / the chip's peak (a "
      f"lower bound on the step time; tregjax.compile.train_flops_per_token: 6 N per token plus attention, and for the "
      f"LoRA rows 4 N_base + 6 N_adapters plus attention, since the frozen base gets no weight gradient; the FLOP "
      f"column was recounted so by `python bench/compile_recipes.py --recount_flops` on the kept reports). The scoring forward runs on one host (4 chips in libtpu's default layout). "
      f"Rows where libtpu refuses to compile ('libtpu refuses') are its own out-of-HBM verdict. Rows come from several "
      f"invocations (e.g. `--recipes R --topologies T`, one topology each; bench/out/compile_recipes.json keeps "
      f"them), some beside other jobs on the 2 cores (peak RSS about 2 GiB each), so the wall column is not a timing. A '+name' recipe is a `VARIANTS` entry: the recipe with the "
      f"overrides its docstring tells a user to pass ({variants}).\n\n"
      f"{text}\n\n{small}\n\n"
      f"Smallest slice: a slice that has fewer chips holds more of the same parameters and more pairs per chip per "
      f"micro-batch (grad_accum_steps is lowered only where a slice has more data-parallel ways than the recipe's "
      f"micro-batch), so nothing below a slice that does not fit fits either: a ladder may start at the slice the "
      f"smaller model's rows point to and stops at the first that fits. A mesh that replicates the parameters "
      f"(mesh.data=-1 with fsdp=1: the LoRA recipe's bfloat16 base, 15 GiB) keeps them whole on every chip whatever "
      f"the slice, so its v5e ladder stops at the first slice.\n"))


if __name__ == "__main__":
  main()
