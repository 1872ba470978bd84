"""The embedded demo over several seeds: is DPO-REG's lower error mass more than seed noise?

    python bench/demo_seeds.py [--seeds 0,1,2] [--arms dpo,dpo_reg,dpo_reg_static,dpo_sft]

Each seed draws a new world (successor tables, demonstrations, pairs) and a new initialisation, then runs the whole
pipeline of configs/demo.py (SFT reference -> scoring -> every arm -> oracle evaluation). Prints mean ± std per arm and
the per-seed DPO-REG / DPO error-mass ratio; writes bench/out/demo_seeds.json.
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--arms", default="dpo,dpo_reg,dpo_reg_static,dpo_sft")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "bench", "out", "demo_seeds"))
  args = parser.parse_args()
  from tregjax import cli
  from tregjax.synthetic import demo
  cli.setup_logging()
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  arms = tuple(args.arms.split(","))
  per_seed = {}
  for seed in map(int, args.seeds.split(",")):
    config = module.get_config()
    config.seed = seed
    config.demo.world_seed = seed
    config.demo.arms = arms
    config.logging.progress_bar = False
    per_seed[seed] = demo.run(config, os.path.join(args.workdir, f"seed{seed}"))["results"]

  names = ("reference",) + arms
  print(f"\n{'policy':<16} {'error mass mean':>16} {'std':>8} {'greedy err':>11} {'sampled err':>12} "
        f"{'credit AUC mean':>16}   error mass per seed")
  summary = {}
  for name in names:
    get = lambda key: np.array([per_seed[s][name][key] for s in per_seed])  # noqa: E731
    masses, aucs = get("error_mass"), get("token_credit_auc")
    greedy, sampled = get("greedy_error_rate"), get("sampled_error_rate")
    summary[name] = dict(error_mass=masses.tolist(), token_credit_auc=aucs.tolist(), greedy_error_rate=greedy.tolist(),
                         sampled_error_rate=sampled.tolist())
    auc = np.nanmean(aucs) if name != "reference" else float("nan")
    print(f"{name:<16} {masses.mean():>16.4f} {masses.std():>8.4f} {greedy.mean():>11.4f} {sampled.mean():>12.4f} "
          f"{auc:>16.3f}   {' '.join(f'{m:.4f}' for m in masses)}")
  if "dpo" in arms and "dpo_reg" in arms:
    for key in ("error_mass", "sampled_error_rate"):
      ratios = [per_seed[s]["dpo_reg"][key] / per_seed[s]["dpo"][key] for s in per_seed]
      print(f"DPO-REG / DPO {key} per seed: {' '.join(f'{r:.2f}' for r in ratios)}")
      summary[f"dpo_reg_over_dpo_{key}"] = ratios
  os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
  with open(os.path.join(ROOT, "bench", "out", "demo_seeds.json"), "w") as f:
    json.dump(dict(seeds=list(per_seed), summary=summary, per_seed=per_seed), f, indent=1)


if __name__ == "__main__":
  main()
