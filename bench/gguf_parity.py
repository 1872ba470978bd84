"""Parity of tregjax's GGUF import with transformers' GGUF loader on the real Qwen2.5-Coder files (#28).

    /work/wt/cpu-exclusive python bench/gguf_parity.py --model qwen2.5-coder-0.5b   (~3 min, ~5 GiB)
    /work/wt/cpu-exclusive python bench/gguf_parity.py --model qwen2.5-coder-1.5b   (~6 min, ~13 GiB)

For one file (`python -m tregjax.assets <model>`, fetched if absent): transformers'
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., local_files_only=True)` in float32 is the golden.
  tensors   every dequantized tensor of `GGUFSource` against transformers' state dict (max |difference|; 0 = equal)
  logits    float32 logits of tregjax's model vs transformers' on chat prompts (max |difference|, and the largest logit)
  greedy    N new tokens, greedy, by tregjax's KV-cache decoder (all prompts in one batch) vs transformers' generate
  tokenizer tregjax's GGUF tokenizer (the asset's tokenizer/ directory) vs transformers' GGUF tokenizer: chat ids
Writes bench/out/gguf_parity_<model>.json and its section of bench/RESULTS.md. These are correctness figures, not
timings (the load times are printed for orientation only).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

import common  # noqa: F401  (puts the repository on sys.path)

CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Tom has 3 boxes of 12 apples. He gives 7 apples to Mia. How many apples does Tom "
                                 "have left?"}],
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                                                         "smollm2"])
  parser.add_argument("--new-tokens", type=int, default=32)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from tregjax import assets, models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding, gguf  # pylint: disable=g-import-not-at-top

  path = assets.fetch(args.model, verbose=True)
  seconds = {}
  t = time.perf_counter()
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          local_files_only=True).eval()
  seconds["transformers_load"] = time.perf_counter() - t
  src = gguf.GGUFSource(path)
  state = ref.state_dict()
  tied = src.config["tie_word_embeddings"]
  missing = set(state) - set(src.keys()) - ({"lm_head.weight"} if tied else set())
  tensor_diff, unequal = 0.0, []
  for name in src.keys():
    ours, theirs = src.get(name), state[name].numpy()
    diff = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
    tensor_diff = max(tensor_diff, diff)
    if diff != 0.0:
      unequal.append(name)
  del state

  tok = transformers.AutoTokenizer.from_pretrained(path.parent / "tokenizer", local_files_only=True)
  t = time.perf_counter()
  hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
  seconds["transformers_tokenizer"] = time.perf_counter() - t
  prompts = []
  tokenizer_equal = True
  for chat in CHATS:
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokenizer_equal &= (text == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                        and ids == hf_tok(text, add_special_tokens=False)["input_ids"])
    prompts.append(ids)

  # transformers' side first (golden logits and greedy tokens), then its model is freed before tregjax's is built:
  # peak memory is one float32 model plus transformers' dequantized copy, not two models (the 1.5B is 6 GiB each).
  eos = [tok.eos_token_id]
  pad = int(tok.pad_token_id or 0)
  golden_logits, golden_tokens = [], []
  for ids in prompts:
    with torch.no_grad():
      golden_logits.append(ref(torch.tensor([ids])).logits.numpy())
      golden_tokens.append(ref.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                        eos_token_id=eos, pad_token_id=pad)[0, len(ids):].tolist())
  del ref
  gc.collect()

  t = time.perf_counter()
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  seconds["tregjax_load"] = time.perf_counter() - t
  logit_diff, logit_scale = 0.0, 0.0
  for ids, golden in zip(prompts, golden_logits):
    ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))
    logit_diff = max(logit_diff, float(np.abs(ours - golden).max()))
    logit_scale = max(logit_scale, float(np.abs(golden).max()))

  out = decoding.generate(model, prompts, max_new_tokens=args.new_tokens, key=jax.random.key(0), eos_ids=eos,
                          pad_id=pad)
  ours_tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  greedy = []
  for row, golden in enumerate(golden_tokens):
    mine = ours_tokens[row, :lengths[row]].tolist()
    first = next((i for i, (a, b) in enumerate(zip(mine, golden)) if a != b), None)
    greedy.append(dict(equal=mine == golden, tokens=len(golden), first_difference=first,
                       text=tok.decode(golden, skip_special_tokens=True)[:80]))

  result = dict(model=args.model, file=str(path), tensor_types=src.tensor_types(), tensors=len(src.keys()),
                missing_tensors=sorted(missing), max_tensor_difference=tensor_diff, unequal_tensors=unequal[:10],
                max_logit_difference=logit_diff, max_abs_logit=logit_scale, tokenizer_equal=bool(tokenizer_equal),
                greedy=greedy, seconds={k: round(v, 1) for k, v in seconds.items()}, machine=common.machine(),
                date=common.today())
  print(result)
  common.write_json(f"gguf_parity_{args.model}", result)
  rows = [[f"{len(src.keys())} tensors ({', '.join(f'{k} {v}' for k, v in result['tensor_types'].items())})",
           f"max abs difference {tensor_diff:g}" + (f"; unequal: {unequal[:3]}" if unequal else " (all equal)")],
          [f"float32 logits, {len(prompts)} chat prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens)",
           f"max abs difference {logit_diff:.2e} (largest abs logit {logit_scale:.1f})"],
          [f"greedy, up to {args.new_tokens} new tokens (tregjax KV-cache decoder, one batch)",
           f"{sum(g['equal'] for g in greedy)}/{len(greedy)} prompts token-identical to transformers' generate"],
          ["chat template + token ids (tregjax's GGUF tokenizer vs transformers')",
           "equal" if tokenizer_equal else "DIFFERENT"]]
  common.update_results(
      f"gguf_parity_{args.model}",
      f"### GGUF parity with transformers' GGUF loader: {args.model} (#28)\n\n"
      f"`/work/wt/cpu-exclusive python bench/gguf_parity.py --model {args.model}` ({common.today()}; "
      f"{common.machine()}). Golden: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., "
      f"local_files_only=True)`, float32.\n\n" + common.table(["check", "result"], rows) + "\n\n"
      + "Greedy continuations (transformers'): " + "; ".join(repr(g["text"]) for g in greedy) + "\n")


if __name__ == "__main__":
  main()
