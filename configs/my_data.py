"""Your own preference data → DPO-REG (DPO + T-REG) on your model: the template. Copy it, or set the four paths on the
command line, and run ONE command; it tokenizes, scores (reference log-probs + T-REG's contrastive token rewards, a
cached stage) and trains:

  python -m tregjax.train --config configs/my_data.py:model=/models/Llama-3.2-1B-Instruct,train=pairs.jsonl \
      --workdir runs/mine
  python -m tregjax.export --workdir runs/mine --out runs/mine/hf          # a Hugging Face directory (vLLM serves it)

A record of `pairs.jsonl` (schema "pair"; docs/data.md lists the "chat" and "ranked" schemas and their fields):

  {"prompt": "What is 17 + 25?", "chosen": "17 + 25 = 42.", "rejected": "17 + 25 = 32."}

Arguments after the colon (each optional; the defaults below are placeholders): model= (a local HF directory with its
tokenizer, or a .gguf file with tokenizer=DIR), train= (one file; several: edit TRAIN_FILES), validation= (a file of
held-out pairs; without it 5% of train is held out), out= (where the tokenized dataset and the scored cache go).
`python -m tregjax.score --config configs/my_data.py:...` runs the scoring pass alone (a cluster job of its own);
the train command then finds the cache finished. Every other key: docs/configuration.md.
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, model="/path/to/your-instruct-model", train="/path/to/pairs.jsonl",
                              validation="", tokenizer="", out="runs/my_data_cache")
  c = config_lib.base_config()
  c.objective = "preference"  # DPO/SimPO (+ T-REG) on scored pairs; "sft" or "reward_model" read the same data keys

  # --- the model: the reference that scores the pairs, and the policy's start -----------------------------------
  c.model.hf_path = args.model  # local: config.json + *.safetensors (+ tokenizer files), or a .gguf file
  c.model.tokenizer_path = args.tokenizer  # only when hf_path holds no tokenizer (a .gguf file)
  c.model.dtype = "bfloat16"  # compute dtype; "float32" on a CPU for exact numbers
  c.model.remat = "full"  # activation checkpointing: "none" is faster when memory allows

  # --- your data --------------------------------------------------------------------------------------------------
  TRAIN_FILES = (args.train,)  # pylint: disable=invalid-name
  c.data.train_files = TRAIN_FILES  # JSONL, parquet, or datasets.save_to_disk directories (format: "auto")
  c.data.validation_files = (args.validation,) if args.validation else ()
  c.data.validation_fraction = 0.0 if args.validation else 0.05  # held out of train when no validation file
  c.data.schema = "pair"  # "pair": prompt/chosen/rejected; "chat": message lists; "ranked": n responses + scores
  # Record field names (for "pair"; "" = absent). Rename here instead of rewriting your files.
  c.data.fields = dict(prompt="prompt", chosen="chosen", rejected="rejected", responses="all_generated_responses",
                       scores="all_rm_scores", id="")
  c.data.system_prompt = ""  # a system message put before every prompt ("" = none)
  c.data.on_bad_record = "error"  # or "skip": count bad records, stop only above data.max_bad_fraction
  c.data.dataset_dir = args.out + "/dataset"  # the tokenized dataset (reused while files and tokenizer are unchanged)
  c.data.cache_dir = args.out + "/scored"  # the scored cache (inputs changed: moved aside to scored.h<hash>, rescored)

  # --- lengths and batches ----------------------------------------------------------------------------------------
  c.data.max_prompt_length = 512  # longer prompts keep their end (data.truncation = "truncate")
  c.data.max_length = 1024  # prompt + response tokens
  c.data.buckets = (256, 512, 1024)  # padded row lengths (each batch shrinks to its longest row)
  c.data.batch_size = 32  # pairs per optimizer step (global, over every device)
  c.optimizer.grad_accum_steps = 4  # micro-batches per step: raise it when a step runs out of memory

  # --- T-REG's contrastive prompts: the reference judges its own tokens under them ---------------------------------
  c.score.better_instruction = ("You are a helpful assistant. Your response must be helpful, correct, coherent, "
                                "and concise.")
  c.score.worse_instruction = ("You are an unhelpful assistant. Your response must be unhelpful, incorrect, "
                               "incoherent, and verbose.")
  c.score.instruction_role = "auto"  # "system" message if the chat template has one, else a user-turn prefix
  c.score.token_reward.source = "contrastive"  # or "confidence": the reference's own, no prompts (docs/credit)

  # --- the objective ----------------------------------------------------------------------------------------------
  c.loss.loss = "dpo"  # dpo | ipo | simpo | tgdpo | tisdpo | confpo
  c.loss.regularizer = "treg"  # "none" = plain DPO
  c.loss.beta = 0.1
  c.loss.alpha = 0.25  # T-REG's weight (the paper searched 0.1 / 0.25 / 0.5)
  c.optimizer.lr = 5e-7
  c.optimizer.warmup_ratio = 0.1
  c.train.steps = -1  # -1: data.epochs passes over the training split
  c.data.epochs = 1

  # --- evaluation, checkpoints, logging ---------------------------------------------------------------------------
  c.data.eval_split = "validation"  # the held-out split above; "" = no evaluation
  c.train.eval_every = 200  # 0 = at the end only
  c.train.log_every = 10
  c.checkpoint.every = 200  # a rerun of the same command resumes from the latest checkpoint

  # --- devices: one mesh axis may be -1 (the rest). FSDP shards parameters and optimizer state over every device. ---
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c
