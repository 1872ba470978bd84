"""Llama-3-8B-Instruct DPO-REG as a single-GPU LoRA run: configs/llama3_8b_dpo_reg.py with rank-16 adapters.

  # One command: scores the BASE model (the LoRA reference) into OUT/scored when needed, then trains the adapters.
  M=/ckpt/Meta-Llama-3-8B-Instruct
  python -m tregjax.train --config configs/llama3_8b_dpo_reg_lora.py:model=$M,train=TRAIN,test=TEST,out=OUT \
      --workdir /runs/llama3_8b_dpo_reg_lora
  python -m tregjax.export --workdir /runs/llama3_8b_dpo_reg_lora --out MERGED_HF_DIR --adapter_out PEFT_DIR

Same data, loss (DPO β 0.01 + T-REG α 0.25), schedule and global batch 128 as the full recipe; only the parameters
that train differ. LoRA rank 16, alpha 32 on all 7 linear projections of every layer (41.9M trainable of 8.03B), the
base frozen in bfloat16 (no gradient, no Adam moments), adapters and their moments in float32. The reference is the
base with adapters off, i.e. what the scoring pass already scored: no second copy of the base is ever loaded.
lr 5e-6 is an assumption, not a tuned value: LoRA steps need a larger lr than full fine-tuning's 7e-7.
Memory (bench/lora_memory.py: the compiled step's memory_analysis, XLA:CPU buffer assignment, seq 2048, full remat):
micro-batches of 8 pairs (batch 128 / grad_accum_steps 16 on one device) need 98.1 GiB (15.4 arguments + 82.6 temp):
one 141 GB H200. On one 80 GB H100 pass --config.optimizer.grad_accum_steps=128 (1 pair: 49.3 GiB). Full
fine-tuning needs 168.5 GiB for 1 pair: neither GPU.
TPU, compiled by libtpu on a CPU host (bench/compile_recipes.py; bench/RESULTS.md "Every recipe compiled for TPU
topologies"; check a slice with `python -m tregjax.compile`, docs/compile.md): v5p-8 (v5p:2x2x1, 4 chips) fits, 26.0
GiB per chip of 95 (15.4 arguments + 10.5 temporaries), its scoring forward 19.6 GiB. On v5e (16 GiB per chip) this
mesh (data=-1) keeps the whole 15 GiB bfloat16 base on every chip whatever the slice: v5e:2x2 is refused by the
compiler (23.4 GiB of temporaries), and so is the scoring forward (19.2 GiB). On v5e pass --config.mesh.data=1
--config.mesh.fsdp=-1: then v5e:2x2 (4 chips) fits, 14.6 GiB per chip (4.1 + 10.5; 91% of HBM, a thin margin), and
the scoring forward needs 8.5 GiB.
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "llama3_8b_dpo_reg", os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b_dpo_reg.py"))
  full = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(full)
  args = config_lib.parse_arg(arg, runlocal=False, model="/path/to/Meta-Llama-3-8B-Instruct",
                              train="/path/to/train", test="/path/to/test", out="/path/to/tregjax_data")
  c = full.get_config(f"model={args.model},train={args.train},test={args.test},out={args.out}")
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.lora.targets = "all_linear"
  c.model.frozen_param_dtype = "bfloat16"
  c.optimizer.lr = 5e-6
  c.optimizer.grad_accum_steps = 16  # 8 pairs per micro-batch on one GPU (1 per device on 8)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1  # one GPU: plain data parallelism over what there is
  if args.runlocal:
    config_lib.shrink_for_cpu(c)
    c.model.lora.rank = 4
  return c
