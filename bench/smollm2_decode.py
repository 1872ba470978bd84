"""SmolLM2-135M greedy KV-cache decoding throughput: tregjax generate vs transformers generate, one run.

    python bench/smollm2_decode.py [--batch 8] [--new 128] [--dtype f32|bf16] [--repeats 3] [--skip-torch]

Both decode `--new` tokens for every row of a batch of real chat prompts (different lengths; tregjax pads
right, transformers pads left with an attention mask), greedy, no early stop (tregjax: no EOS ids;
transformers: min_new_tokens = max_new_tokens), prefill included. Variants are timed round-robin; torch is
timed at its default thread count and at 1 thread (its OpenMP pool collapses on an oversubscribed CPU). tokens/s = batch * new / median seconds.
"""

from __future__ import annotations

import argparse
import time

from smollm2_common import (chat_prompt_ids, gguf_path, machine, table, timed_interleaved, today, update_results,
                            write_json)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--torch-threads", default="",
                      help="comma-separated torch thread counts to time (default: torch's default and 1)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top

  path = gguf_path()
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind if backend != "cpu" else machine()
  prompts = chat_prompt_ids(args.batch)
  n_new = args.batch * args.new
  model = models.from_pretrained(str(path), dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype],
                                 param_dtype=jnp.float32)

  def run_tj():
    out = decoding.generate(model, prompts, max_new_tokens=args.new, key=jax.random.key(0), temperature=0.0,
                            eos_ids=(), pad_id=0)
    return jax.block_until_ready(out.tokens)

  t0 = time.perf_counter()
  first = np.asarray(run_tj())  # compiles prefill + the decode loop
  first_s = time.perf_counter() - t0
  fns = {"tregjax": run_tj}
  results = {"date": today(), "device": device, "backend": backend, "dtype": args.dtype, "batch": args.batch,
             "new_tokens": args.new, "prompt_lengths": [len(p) for p in prompts], "first_call_s": first_s}

  if backend == "cpu" and not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).eval()
    width = max(len(p) for p in prompts)
    pad = ref.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    threads = torch.get_num_threads()

    def torch_generate(k):  # torch's OpenMP pool degrades badly on an oversubscribed CPU, so 1 thread is timed too
      def run():
        torch.set_num_threads(k)
        with torch.inference_mode():
          return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=pad)
      return run

    counts = [int(k) for k in args.torch_threads.split(",")] if args.torch_threads else sorted({threads, 1})[::-1]
    th_out = torch_generate(counts[-1])()  # warm-up
    assert th_out.shape[1] == width + args.new
    for k in counts:
      fns[f"torch-{k}thread"] = torch_generate(k)
    # Greedy agreement before any EOS (tregjax has no EOS stop here; min_new_tokens masks EOS in torch).
    results["agreement_first_16"] = float((th_out[:, width:width + 16].numpy() == first[:, :16]).mean())

  for name, (med, all_s) in timed_interleaved(fns, args.repeats).items():
    results[name] = {"median_s": med, "all_s": all_s, "tokens_per_s": n_new / med}

  best_torch = max((results[k]["tokens_per_s"] for k in fns if k.startswith("torch")), default=float("nan"))
  rows = [[name, f"{results[name]['median_s']:.2f}", f"{results[name]['tokens_per_s']:.1f}",
           f"{results[name]['tokens_per_s'] / best_torch:.2f}x" if best_torch == best_torch else "-"]
          for name in fns]
  text = table(["framework", "median s (prefill + decode)", "new tokens/s", "speed vs best torch"], rows)
  print(f"SmolLM2-135M greedy decode, batch {args.batch}, {args.new} new tokens, {args.dtype}, {device} "
        f"(tregjax first call incl. compile {first_s:.1f} s; prompt lengths {results['prompt_lengths']})")
  print(text)
  print(f"wrote {write_json(f'smollm2_decode_{args.dtype}_{backend}', results)}")
  cmd = f"python bench/smollm2_decode.py --batch {args.batch} --new {args.new} --dtype {args.dtype}" + (
      f" --torch-threads {args.torch_threads}" if args.torch_threads else "")
  update_results(f"smollm2_decode_{args.dtype}_{backend}", (
      f"### SmolLM2-135M KV-cache greedy decode, {args.dtype}, {backend}\n\n"
      f"`{cmd}` ({today()}, {device}; median of {args.repeats}, interleaved; prefill included; tregjax first call incl. "
      f"compile {first_s:.1f} s; goal: >= 1.5x transformers).\n\n{text}\n"))


if __name__ == "__main__":
  main()
