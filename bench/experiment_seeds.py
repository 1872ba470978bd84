"""An experiment over several seeds and a short α sweep: is an arm's difference from DPO more than seed noise?

    python bench/experiment_seeds.py --config configs/demo.py --seeds 0,1,2 [--alphas 0.1,0.25,0.5]
    python bench/experiment_seeds.py --config configs/smollm2_arith.py --seeds 0,1,2 --alphas 0.1,0.25,0.5 \\
        --set arith.train_prompts=96 --set arith.eval_prompts=200 --arms dpo,dpo_reg,dpo_reg_oracle

Each seed is a new world (the synthetic world's tables and pairs, or new arithmetic problems and samples), a new
initialisation and sampling key, through the whole runner (tregjax/experiments/runner.py). The α sweep retrains only
DPO-REG at each α on the seed's own scored pairs (the seed's other stages are linked, not recomputed). Prints the
primary metric per arm as mean with a 95% interval over seeds, and DPO-REG minus DPO per seed; writes
bench/out/experiment_seeds_<config>.json and the table into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import common
import numpy as np

ROOT = str(common.REPO)

# The primary metric of each task (what `results.json["policies"][p]` holds) and whether lower is better.
PRIMARY = {"synthetic": ("error_mass", True), "smollm2-arith": ("accuracy", False)}
SHARED_STAGES = ("world", "reference", "problems", "samples", "dataset", "scored")


def load_config(spec: str, overrides: list[str]):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
  return config


def reseed(config, seed: int) -> None:
  config.seed = seed
  if "demo" in config:
    config.demo.world_seed = seed
  if "arith" in config:
    config.arith.seed = seed


def link_shared(src: str, dst: str) -> None:
  """The α variant reuses the seed's world, reference, samples and scored caches (symlinks: nothing recomputed)."""
  os.makedirs(dst, exist_ok=True)
  for name in SHARED_STAGES:
    if os.path.exists(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
      os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
  if os.path.exists(os.path.join(src, "eval")):
    os.makedirs(os.path.join(dst, "eval"), exist_ok=True)
    for policy in ("reference",):
      if os.path.exists(os.path.join(src, "eval", policy)) and not os.path.exists(os.path.join(dst, "eval", policy)):
        os.symlink(os.path.abspath(os.path.join(src, "eval", policy)), os.path.join(dst, "eval", policy))


def interval(values) -> str:
  from tregjax.experiments import stats
  values = [v for v in values if v is not None and not np.isnan(v)]
  if len(values) < 2:
    return f"{values[0]:.4f}" if values else "n/a"
  mean, low, high = stats.mean_interval(values)
  return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/demo.py", help="configs/x.py[:arg]")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--alphas", default="", help="comma-separated α values for DPO-REG ('' -> no sweep)")
  parser.add_argument("--arms", default="", help="comma-separated arms (default: the config's)")
  parser.add_argument("--set", action="append", default=[], help="config override key=value (JSON value)")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--tag", default="", help="suffix of the RESULTS.md section and JSON name (keeps another run's)")
  parser.add_argument("--results", default=str(common.RESULTS), help="'' -> print only")
  args = parser.parse_args()
  from tregjax import cli
  from tregjax.experiments import arms as arms_lib
  from tregjax.experiments import runner
  cli.setup_logging()
  name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0] + (f"_{args.tag}" if args.tag else "")
  workdir = args.workdir or os.path.join(ROOT, "bench", "out", f"experiment_seeds_{name}")
  t0 = time.perf_counter()
  per_seed, sweep = {}, {}
  task = None
  for seed in map(int, args.seeds.split(",")):
    config = load_config(args.config, args.set)
    reseed(config, seed)
    if args.arms:
      config.experiment.arms = tuple(args.arms.split(","))
      config.experiment.credit_policies = tuple(p for p in config.experiment.credit_policies
                                                if p in config.experiment.arms)
    config.logging.progress_bar = False
    seed_dir = os.path.join(workdir, f"seed{seed}")
    out = runner.run(config, seed_dir)
    task = out["task"]
    per_seed[seed] = out
    for alpha in [float(a) for a in args.alphas.split(",") if a]:
      if abs(alpha - float(config.loss.alpha)) < 1e-12 and "dpo_reg" in config.experiment.arms:
        sweep.setdefault(alpha, {})[seed] = out["policies"]["dpo_reg"]
        continue
      variant = load_config(args.config, args.set)
      reseed(variant, seed)
      variant.loss.alpha = alpha
      variant.experiment.arms = ("dpo_reg",)  # DPO is the seed's own (its config does not depend on α)
      variant.experiment.credit_policies = ()
      variant.experiment.reward_model_steps = 0  # R3HF's AUC is the seed's own; the variant only retrains DPO-REG
      variant.logging.progress_bar = False
      alpha_dir = os.path.join(workdir, f"seed{seed}_alpha{alpha:g}")
      link_shared(seed_dir, alpha_dir)
      sweep.setdefault(alpha, {})[seed] = runner.run(variant, alpha_dir)["policies"]["dpo_reg"]

  metric, lower_better = PRIMARY[task]
  seeds = list(per_seed)
  arms = ["reference"] + list(per_seed[seeds[0]]["arms"])
  # Stage wall times as first computed (a rerun reuses cached stages, so its own wall time says little).
  computed = sum(sum(per_seed[s]["seconds"].values()) for s in seeds) / 60
  when = common.today()
  lines = [f"`python bench/experiment_seeds.py {' '.join(sys.argv[1:])}` ({when}; "
           f"stages {computed:.0f} min of 2-core CPU as first computed, this invocation "
           f"{(time.perf_counter() - t0) / 60:.0f} min; task {task}; {metric}, "
           f"{'lower' if lower_better else 'higher'} is better; mean [95% interval over seeds])", "",
           f"| policy | {metric} per seed | mean [95%] | − DPO per seed | mean [95%] |", "|---|---|---|---|---|"]
  summary = {}
  for arm in arms:
    values = [per_seed[s]["policies"][arm][metric] for s in seeds]
    diffs = ([per_seed[s]["policies"][arm][metric] - per_seed[s]["policies"]["dpo"][metric] for s in seeds]
             if arm not in ("reference", "dpo") and "dpo" in per_seed[seeds[0]]["policies"] else [])
    summary[arm] = dict(values=values, minus_dpo=diffs)
    label = arms_lib.label(arm)
    lines.append(f"| {label} | {' '.join(f'{v:.4f}' for v in values)} | {interval(values)} | "
                 f"{' '.join(f'{d:+.4f}' for d in diffs)} | {interval(diffs) if diffs else ''} |")
  auc_rows = ["", "| token-reward source | AUC per seed | mean [95%] |", "|---|---|---|"]
  for source in per_seed[seeds[0]]["token_credit"]["sources"]:
    values = [per_seed[s]["token_credit"]["sources"][source]["auc"] for s in seeds]
    auc_rows.append(f"| {runner.credit_label(source)} | {' '.join(f'{v:.3f}' for v in values)} | "
                    f"{interval(values)} |")
  lines += auc_rows
  if sweep:
    lines += ["", f"| α (DPO-REG) | {metric} per seed | mean [95%] | − DPO per seed | mean [95%] |",
              "|---|---|---|---|---|"]
    for alpha in sorted(sweep):
      values = [sweep[alpha][s][metric] for s in seeds]
      diffs = [sweep[alpha][s][metric] - per_seed[s]["policies"]["dpo"][metric] for s in seeds]
      summary[f"dpo_reg_alpha_{alpha:g}"] = dict(values=values, minus_dpo=diffs)
      lines.append(f"| {alpha:g} | {' '.join(f'{v:.4f}' for v in values)} | {interval(values)} | "
                   f"{' '.join(f'{d:+.4f}' for d in diffs)} | {interval(diffs)} |")
  table = "\n".join(lines)
  print("\n" + table)
  common.write_json(f"experiment_seeds_{name}", dict(
      seeds=seeds, summary=summary, per_seed={s: per_seed[s]["policies"] for s in seeds},
      token_credit={s: per_seed[s]["token_credit"] for s in seeds}))
  if args.results:
    common.update_results(f"experiment_seeds_{name}", table, args.results)


if __name__ == "__main__":
  main()
