"""Greedy KV-cache decoding throughput: tregjax `decoding.generate` vs transformers `generate`, same random Llama.

    python bench/model_decode.py [--layers 4] [--width 512] [--vocab 32000] [--batch 4] [--prompt 64] [--new 64]

Both run prefill + `new` greedy steps with a KV cache and no early stop; tokens/s counts generated tokens.
The generated tokens are compared (same weights, f32), so the timing is of equal work.
"""

from __future__ import annotations

import argparse
import time

import model_common
from smollm2_common import machine, table, timed_interleaved, today, update_results, write_json


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch-threads", default="0,1", help="torch thread counts to time (0: torch's default)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top

  hf_config = model_common.llama_hf_config(args.layers, args.width, args.vocab)
  torch_model, path = model_common.save_random_hf_llama(hf_config)
  model = models.from_pretrained(path, dtype=jnp.float32)
  prompts = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.prompt)).astype(np.int32)
  prompt_list = prompts.tolist()
  key = jax.random.key(0)

  def run_tregjax():
    return jax.block_until_ready(decoding.generate(model, prompt_list, max_new_tokens=args.new, key=key))

  t0 = time.perf_counter()
  out = run_tregjax()  # compiles prefill + the decode loop
  first_s = time.perf_counter() - t0

  ids = torch.from_numpy(prompts.astype(np.int64))

  def torch_runner(threads):
    def run():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        return torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0,
                                    use_cache=True)
    return run

  default_threads = torch.get_num_threads()
  thread_counts = [int(t) or default_threads for t in args.torch_threads.split(",")]
  runners = {"tregjax": run_tregjax}
  # On a shared, busy machine torch's OpenMP threads can spin against each other: time each thread count, and
  # run all variants round-robin so that they see the same load.
  runners.update({f"torch_{t}": torch_runner(t) for t in thread_counts})
  ref = runners[f"torch_{thread_counts[-1]}"]()  # warm-up
  times = timed_interleaved(runners, args.repeats)
  n_new = args.batch * args.new
  results = {"date": today(), "device": machine(), "args": vars(args)}
  for name, (sec, all_s) in times.items():
    results[name] = {"median_s": sec, "all_s": all_s, "tokens_per_s": n_new / sec}
    if name != "tregjax":
      results[name]["threads"] = int(name.split("_")[1])
  results["tregjax"]["first_call_s"] = first_s
  same = float((np.asarray(out.tokens) == ref[:, args.prompt:].numpy()).mean())
  results["tokens_equal_fraction"] = same
  names = ["tregjax"] + [k for k in results if k.startswith("torch_")]
  best = min(results[k]["median_s"] for k in names[1:])
  rows = [[f"torch ({results[k]['threads']} threads)" if k != "tregjax" else k, f"{results[k]['median_s']:.3f}",
           f"{results[k]['tokens_per_s']:.0f}", f"{best / results[k]['median_s']:.2f}x"] for k in names]
  text = table(["framework", "median s / generate", "new tokens/s", "speed vs fastest torch"], rows)
  desc = (f"random Llama {args.layers} layers, width {args.width}, vocab {args.vocab}; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy, f32")
  print(desc)
  print(text)
  print(f"identical generated tokens: {same:.1%}; tregjax first call (incl. compile) {first_s:.1f} s")
  print(f"wrote {write_json('model_decode_cpu', results)}")
  cmd = (f"python bench/model_decode.py --layers {args.layers} --width {args.width} --vocab {args.vocab} "
         f"--batch {args.batch} --prompt {args.prompt} --new {args.new}"
         f" --torch-threads {args.torch_threads}")
  update_results("model_decode_cpu", (
      f"### KV-cache decoding ({desc})\n\n`{cmd}` ({today()}, {machine()}; median of {args.repeats}, round-robin; "
      f"compile excluded: tregjax's first call took {first_s:.1f} s). Generated tokens identical: {same:.1%}."
      f"\n\n{text}\n"))


if __name__ == "__main__":
  main()
