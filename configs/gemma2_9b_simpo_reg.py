"""Gemma-2-9B-it, SimPO-REG (SimPO + T-REG token-level regularization): the paper's recipe for real hardware.

  # One command: tokenizes, scores into OUT/scored when the cache is missing or of other inputs, then trains.
  M=/ckpt/gemma-2-9b-it
  python -m tregjax.train --config configs/gemma2_9b_simpo_reg.py:model=$M,train=TRAIN,test=TEST,out=OUT \
      --workdir gs://.../gemma2_9b_simpo_reg

Where each number comes from:
- SimPO release training_configs/gemma-2-9b-it-simpo.yaml (princeton-nlp/SimPO): beta 10, gamma_beta_ratio 0.5,
  lr 8e-7, 1 epoch, cosine, warmup_ratio 0.1, max_length 2048, max_prompt_length 1800, bf16, gradient
  checkpointing, seed 42, dataset princeton-nlp/gemma2-ultrafeedback-armorm (train/test). tregjax's `gamma` is
  SimPO's absolute margin γ = β · gamma_beta_ratio = 10 · 0.5 = 5.0.
- Global batch 128 (SimPO paper, all methods); HF Trainer defaults: weight_decay 0, betas (0.9, 0.999), eps 1e-8,
  max_grad_norm 1.
- T-REG (Zhou et al., 2024) reports SimPO-REG on Gemma-2-9B-it with SimPO's setup and data; alpha searched in
  {0.1, 0.25, 0.5} (0.25 here is the middle of that grid, not a reported optimum). The regularizer is length-averaged
  for SimPO (reg_normalization="auto"), our reading since the T-REG code is unreleased.
Hardware: FSDP over all devices (e.g. 8×H100 80GB), full remat, bf16 compute with f32 master weights, micro-batches
of 16 pairs (grad_accum_steps=8). Compiled for TPU by libtpu on a CPU host (bench/compile_recipes.py; bench/RESULTS.md
"Every recipe compiled for TPU topologies"; check a slice with `python -m tregjax.compile`, docs/compile.md): the
smallest v5p slice, v5p-8 (v5p:2x2x1, 4 chips), fits with 77.8 GiB per chip of 95 (25.8 arguments + 52.0
temporaries); on v5e (16 GiB per chip) 16 chips (v5e:4x4) need 18.6 GiB and do not fit, 32 chips (v5e:4x8,
--config.optimizer.grad_accum_steps=4: one pair per chip per micro-step) need 12.2 GiB. The scoring forward needs
10.3 GiB per chip on one 4-chip host. 8×H100 is not compiled here (an AOT compile for GPUs needs a GPU).
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, model="/path/to/gemma-2-9b-it",
                              train="/path/to/train", test="/path/to/test", out="/path/to/tregjax_data")
  c = config_lib.base_config()
  c.seed = 42
  c.objective = "preference"
  c.model.hf_path = args.model
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"

  # The SimPO release's on-policy UltraFeedback pairs: its train and test splits (JSONL, parquet or save_to_disk
  # directories), tokenized into out/dataset and scored into out/scored (tregjax.train scores them when needed).
  c.data.train_files = (args.train,)
  c.data.validation_files = (args.test,)  # the release's test split is the builder's "validation" split
  c.data.dataset_dir = args.out + "/dataset"
  c.data.cache_dir = args.out + "/scored"
  c.data.schema = "chat"
  c.data.max_prompt_length = 1800
  c.data.max_length = 2048
  c.data.truncation = "truncate"
  c.data.buckets = (512, 1024, 2048)
  c.data.batch_size = 128
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.epochs = 1

  c.loss.loss = "simpo"
  c.loss.beta = 10.0
  c.loss.gamma = 5.0  # beta * gamma_beta_ratio (0.5)
  c.loss.regularizer = "treg"
  c.loss.alpha = 0.25
  c.loss.reg_normalization = "auto"

  c.optimizer.lr = 8e-7
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.grad_clip = 1.0
  c.optimizer.grad_accum_steps = 8

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.train.steps = -1
  c.train.log_every = 5
  c.train.eval_every = 400
  c.checkpoint.every = 100
  c.checkpoint.keep = 2
  if args.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
