"""Llama-3-8B-Instruct, DPO-REG (DPO + T-REG token-level regularization): the paper's recipe for real hardware.

  # One command: tokenizes TRAIN/TEST into OUT/dataset, scores them into OUT/scored (reference log-probs and
  # contrastive token rewards; skipped when the cache is current), then trains. OUT is a shared POSIX mount.
  M=/ckpt/Meta-Llama-3-8B-Instruct
  python -m tregjax.train --config configs/llama3_8b_dpo_reg.py:model=$M,train=TRAIN,test=TEST,out=OUT \
      --workdir gs://.../llama3_8b_dpo_reg
  # Clusters that score as their own job: the same config with python -m tregjax.score first.

Where each number comes from:
- T-REG (Zhou et al., 2024, "T-REG: Preference Optimization with Token-Level Reward Regularization") trains on the
  SimPO release's on-policy UltraFeedback pairs and follows SimPO's training setup; its code was never released.
- DPO on Llama-3-8B-Instruct: beta = 0.01, lr = 7e-7 (SimPO paper, appendix table of baseline hyperparameters for the
  Llama-3-Instruct setting).
- SimPO release training_configs/llama-3-8b-instruct-simpo.yaml (princeton-nlp/SimPO): 1 epoch, cosine schedule,
  warmup_ratio 0.1, max_length 2048, max_prompt_length 1800, adamw_torch, bf16, gradient checkpointing, seed 42;
  dataset princeton-nlp/llama3-ultrafeedback(-armorm) with train/test splits. Global batch 128 (SimPO paper:
  "batch size 128" for all methods; the yaml's per_device 2 × grad_accum 16 reaches it on 4 GPUs).
- HF Trainer defaults that the yaml leaves in place: weight_decay 0, betas (0.9, 0.999), eps 1e-8, max_grad_norm 1.
- alpha = 0.25: T-REG searched alpha in {0.1, 0.25, 0.5}; 0.25 is the middle of that grid, not a reported optimum.
Hardware: FSDP over all devices, full remat, bf16 compute with f32 master weights, micro-batches of 16 pairs
(grad_accum_steps=8). Compiled for TPU by libtpu on a CPU host (bench/compile_recipes.py, bench/RESULTS.md "Every recipe
compiled for TPU topologies"; check a slice yourself with `python -m tregjax.compile ... --topology T`, docs/compile.md):
a v5p-16 slice (v5p:2x2x2, 8 chips) needs 36.3 GiB per chip of its 95 (11.2 arguments + 25.0 temporaries), the
smallest, v5p-8 (v5p:2x2x1, 4 chips), 71.5 GiB; on v5e (16 GiB per chip) 4 and 8 chips are refused by the
compiler, 16 chips (v5e:4x4) need 17.9 GiB and do not fit, 32 chips
(v5e:4x8, --config.optimizer.grad_accum_steps=4: one pair per chip per micro-step) need 11.8 GiB. The scoring forward
needs 8.5 GiB per chip on one 4-chip v5e host. 8×H100 80GB (the same mesh on 8 devices) is not compiled here (an AOT
compile for GPUs needs a GPU); the TPU figure for 8 chips suggests it fits.
Expected: reward accuracy on the held-out split rising above DPO's; AlpacaEval-2/Arena-Hard are not run here.
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, model="/path/to/Meta-Llama-3-8B-Instruct",
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
  c.data.schema = "chat"  # chosen/rejected message lists (UltraFeedback-binarized style)
  c.data.max_prompt_length = 1800
  c.data.max_length = 2048
  c.data.truncation = "truncate"
  c.data.buckets = (512, 1024, 2048)
  c.data.batch_size = 128
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.epochs = 1

  c.loss.loss = "dpo"
  c.loss.beta = 0.01
  c.loss.regularizer = "treg"
  c.loss.alpha = 0.25
  c.loss.weighting = "dynamic"

  c.optimizer.lr = 7e-7
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.grad_clip = 1.0
  c.optimizer.grad_accum_steps = 8

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.train.steps = -1  # one epoch
  c.train.log_every = 5
  c.train.eval_every = 400
  c.checkpoint.every = 100
  c.checkpoint.keep = 2
  if args.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
