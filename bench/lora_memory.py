"""What LoRA saves: compiled DPO-REG step memory (Llama 1.2B / 8B, seq 2048) and CPU step time (SmolLM2 shape).

    python bench/lora_memory.py [--repeats 3] [--time_seq 64]

Memory: the trainer's step is lowered and compiled from abstract shapes only (nothing allocated, nothing run) for
one pair (2 rows x 2048 tokens), bf16 compute, full remat, and `compiled.memory_analysis()` gives argument + temp
bytes: full fine-tuning (f32 weights, grads, Adam) vs LoRA rank 16 on all linear layers (bf16 frozen base, f32
adapters and moments). XLA:CPU's buffer assignment, not a GPU's: a planning figure, not a measurement.
Time: the trainer's jitted step on SmolLM2-135M's shape (random weights, f32), full vs LoRA r16 all-linear vs the
top half of the layers frozen (`train.freeze`), interleaved round-robin, median; the CPU is shared.
"""

from __future__ import annotations

import argparse
import time

import common

LLAMA = {
    "llama3p2_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}
SMOLLM2 = common.SMOLLM2_SHAPE


def config_for(shape: dict, variant: str, seq: int, dtype: str, remat: str):
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.preset = "tiny_llama"
  c.model.overrides = dict(shape, max_position_embeddings=max(seq, 512), rope_theta=500000.0)
  c.model.dtype = dtype
  c.model.remat = remat
  c.loss.loss, c.loss.regularizer = "dpo", "treg"
  c.data.batch_size = 1
  c.data.buckets = (seq,)
  c.data.max_prompt_length, c.data.max_length = seq // 2, seq
  c.train.logits_chunk_size = min(seq, 512)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  if variant == "lora":
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.targets = 16, 32.0, "all_linear"
    c.model.frozen_param_dtype = "bfloat16"
  elif variant == "top_half_frozen":
    half = shape["num_layers"] // 2
    c.train.freeze = "model/layers/(" + "|".join(str(i) for i in range(half, shape["num_layers"])) + ")/"
  return c


def compiled_memory(config, seq: int, pairs: int = 1) -> dict[str, float]:
  """argument / temp GiB of the compiled step, from abstract state and batch (no allocation)."""
  import jax  # pylint: disable=g-import-not-at-top
  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  program, _ = common.trainer_program(config, init=False)
  mesh = program.mesh
  batch = common.preference_batch(pairs, seq // 2, seq - seq // 2 - 1, 1000)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh, x.ndim)),
                       batch)
  t0 = time.perf_counter()
  with parallel.use_mesh(mesh):
    mem = program.train_step.lower(program.target, batch).compile().memory_analysis()
  gib = 2.0 ** 30
  trainable = sum(x.size for x in jax.tree.leaves(program.target.params))
  return {"argument_gib": mem.argument_size_in_bytes / gib, "temp_gib": mem.temp_size_in_bytes / gib,
          "total_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib, "trainable": trainable,
          "compile_s": time.perf_counter() - t0}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--time_seq", type=int, default=64)
  ap.add_argument("--skip_time", action="store_true")
  a = ap.parse_args()
  mem_rows, payload = [], {"memory": {}, "time": {}}
  for name, shape in LLAMA.items():
    for variant in ("full", "lora"):
      m = compiled_memory(config_for(shape, variant, 2048, "bfloat16", "full"), 2048)
      payload["memory"][f"{name}/{variant}"] = m
      fits = ", ".join(f"{cap} GB: {'yes' if m['total_gib'] <= cap else 'no'}" for cap in (80, 141))
      mem_rows.append([name, variant, f"{m['trainable'] / 1e6:,.1f}M", f"{m['argument_gib']:.1f}",
                       f"{m['temp_gib']:.1f}", f"{m['total_gib']:.1f}", fits])
      print(mem_rows[-1], flush=True)
  # configs/llama3_8b_dpo_reg_lora.py on one GPU: micro-batches of 8 pairs (batch 128 / grad_accum_steps 16).
  recipe = config_for(LLAMA["llama3_8b"], "lora", 2048, "bfloat16", "full")
  recipe.data.batch_size = 8
  m = compiled_memory(recipe, 2048, pairs=8)
  payload["memory"]["llama3_8b/lora_recipe_8_pairs"] = m
  mem_rows.append(["llama3_8b", "lora, 8 pairs (the recipe)", f"{m['trainable'] / 1e6:,.1f}M",
                   f"{m['argument_gib']:.1f}", f"{m['temp_gib']:.1f}", f"{m['total_gib']:.1f}",
                   ", ".join(f"{cap} GB: {'yes' if m['total_gib'] <= cap else 'no'}" for cap in (80, 141))])
  print(mem_rows[-1], flush=True)
  md = (f"### LoRA vs full fine-tuning: DPO-REG step memory and CPU step time ({common.today()})\n\n"
        "`python bench/lora_memory.py`. Memory: `compiled.memory_analysis()` of the trainer's step, lowered from "
        "abstract shapes (nothing allocated or run), 1 pair = 2 rows x 2048 tokens, bf16 compute, full remat; full = "
        "f32 weights + Adam; LoRA = rank 16 on all 7 linear projections, bf16 frozen base, f32 adapters + Adam. "
        "XLA:CPU buffer assignment: a planning figure (GPU temp buffers differ).\n\n"
        + common.table(["model", "run", "trainable", "argument GiB", "temp GiB", "total GiB", "fits in"], mem_rows))
  if not a.skip_time:
    batch = common.preference_batch(1, a.time_seq // 2, a.time_seq - a.time_seq // 2 - 1, SMOLLM2["vocab_size"])
    runners = {}
    for variant in ("full", "lora", "top_half_frozen"):
      config = config_for(SMOLLM2, variant, a.time_seq, "float32", "none")
      runners[variant], _, _ = common.compiled_runner(config, batch)
    times = common.timed_interleaved(runners, a.repeats)
    payload["time"] = {k: v[0] for k, v in times.items()}
    rows = [[k, f"{times[k][0]:.2f}", f"{times[k][0] / times['full'][0]:.2f}"] for k in runners]
    md += (f"\n\nCPU step time on SmolLM2-135M's shape (random weights, f32, 1 pair x {a.time_seq} tokens, median of "
           f"{a.repeats} interleaved steps; run once, briefly, on a shared machine: {common.machine()}):\n\n"
           + common.table(["run", "step s", "vs full"], rows))
  print(md)
  common.write_json("lora_memory", payload)
  common.update_results("lora", md)


if __name__ == "__main__":
  main()
