"""KV-cache decoding throughput: tregjax `decoding.generate` (the sampler of `tregjax.generate`) vs transformers
`generate`, same weights, same prompts, one run.

    python bench/decode.py --weights random [--layers 4] [--width 512] [--ffn F] [--vocab 32000] [--shape llama|smollm2]
                           [--prompt 64]
    python bench/decode.py --weights smollm2
        common: [--batch 4] [--samples 1] [--new 64] [--modes greedy,sampled] [--dtype f32|bf16] [--repeats 3]
                [--torch-threads 0,1|probe] [--skip-torch]

--weights random: a random Llama (`--layers` x `--width`, MLP `--ffn` (default 8/3 · width), `--vocab`; or, with
`--shape smollm2`, exactly SmolLM2-135M's shape) saved by transformers and loaded by tregjax, on `--batch` random
prompts of `--prompt` ids. --weights smollm2: SmolLM2-135M-Instruct from its GGUF, on `--batch` real chat prompts of
different lengths (tregjax pads right, transformers left with an attention mask). Each prompt is decoded `--samples`
times, as one batch of prompts x samples rows (the rows `tregjax.generate` batches for on-policy sampling). Both
decode exactly `--new` tokens per row with a KV cache, prefill included, no early stop (tregjax: no EOS ids;
transformers: min_new_tokens = max_new_tokens); greedy and/or sampled (temperature 0.8, top-p 0.95). tokens/s counts
generated tokens (rows x new / median seconds); compile time is excluded from the median (the first call is
reported, and compile = first call - median). Greedy tokens are compared with transformers'. Fairness on a shared
CPU: every torch thread count in --torch-threads (0: torch's default) is timed, round-robin with tregjax, or with
`probe` only the faster of 1 and all cores in a short probe. On an accelerator the torch CPU rows are skipped.
"""

from __future__ import annotations

import argparse
import os
import time

import common

SAMPLED = dict(temperature=0.8, top_p=0.95)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_weights_args(parser)
  parser.add_argument("--batch", type=int, default=4, help="prompts")
  parser.add_argument("--samples", type=int, default=1, help="rows per prompt")
  parser.add_argument("--prompt", type=int, default=64, help="prompt length (random weights)")
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--modes", default="greedy", help="comma-separated: greedy, sampled")
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--torch-threads", default="0,1",
                      help="torch thread counts to time (0: torch's default), or 'probe': the faster of 1 and all")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  device = common.device()
  run_torch = backend == "cpu" and not args.skip_torch
  modes = args.modes.split(",")
  model, torch_model, vocab, desc = common.load_models(args, args.dtype, run_torch)
  if args.weights == "smollm2":
    prompts = common.chat_prompt_ids(args.batch)
    desc += f", {args.batch} chat prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
  else:
    prompts = np.random.default_rng(0).integers(3, vocab, (args.batch, args.prompt)).tolist()
    desc += f"; {args.batch} prompts of {args.prompt} tokens"
  rows = [p for p in prompts for _ in range(args.samples)]  # tregjax.generate's (prompt, sample) rows
  n_new = len(rows) * args.new
  desc += (f" x {args.samples} samples = {len(rows)} rows, {args.new} new tokens each, no EOS, {args.dtype}, "
           + ", ".join(m + (" (temperature 0.8, top-p 0.95)" if m == "sampled" else "") for m in modes))

  def ours(kw):
    out = decoding.generate(model, rows, max_new_tokens=args.new, key=jax.random.key(0), **kw)
    return jax.block_until_ready(out.tokens)

  thread_counts, probe = [], {}
  if run_torch:
    import torch  # pylint: disable=g-import-not-at-top
    width = max(len(p) for p in rows)
    if args.weights == "smollm2":
      pad = torch_model.config.pad_token_id
      stop = {}  # the model's EOS stays; min_new_tokens masks it
    else:
      pad, stop = 0, {"eos_token_id": None}
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])

    def theirs(kw, threads, new=args.new):
      def run():
        torch.set_num_threads(threads)
        sampling = {"temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": 0} if kw else {}
        with torch.inference_mode():
          return torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=bool(kw), pad_token_id=pad, use_cache=True, **stop, **sampling)
      return run

    if args.torch_threads == "probe":  # one short sampled run per thread count, after a warm-up each
      for threads in sorted({1, os.cpu_count() or 1}):
        theirs(SAMPLED, threads, new=8)()
        t0 = time.perf_counter()
        theirs(SAMPLED, threads, new=8)()
        probe[threads] = time.perf_counter() - t0
      thread_counts = [min(probe, key=probe.get)]
    else:
      default_threads = torch.get_num_threads()
      thread_counts = list(dict.fromkeys(int(t) or default_threads for t in args.torch_threads.split(",")))

  results = {"date": common.today(), "device": device, "backend": backend, "args": vars(args),
             "prompt_lengths": [len(p) for p in prompts], "torch_thread_probe_s": probe, "modes": {}}
  table_rows = []
  for mode in modes:
    kw = {"greedy": {}, "sampled": SAMPLED}[mode]
    t0 = time.perf_counter()
    first = np.asarray(ours(kw))  # the first call traces and compiles prefill + the decode loop
    first_s = time.perf_counter() - t0
    runners = {"tregjax": lambda kw=kw: ours(kw)}
    entry = results["modes"][mode] = {}
    if thread_counts:
      ref = theirs(kw, thread_counts[-1])()  # warm-up
      assert ref.shape == (len(rows), width + args.new), ref.shape
      if mode == "greedy":
        same = ref[:, width:].numpy() == first
        entry["tokens_equal_fraction"] = float(same.mean())
        entry["tokens_equal_first_16"] = float(same[:, :16].mean())
      runners |= {f"torch_{t}": theirs(kw, t) for t in thread_counts}
    times = common.timed_interleaved(runners, args.repeats)
    best = min((times[k][0] for k in runners if k != "tregjax"), default=None)
    for name, (sec, all_s) in times.items():
      r = entry[name] = {"median_s": sec, "all_s": all_s, "samples_per_s": len(rows) / sec,
                         "tokens_per_s": n_new / sec}
      if name == "tregjax":
        r.update(first_call_s=first_s, compile_s=first_s - sec)
      table_rows.append([mode, name if name == "tregjax" else f"torch ({name.split('_')[1]} threads)", f"{sec:.3f}",
                         f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                         f"{first_s:.1f} / {first_s - sec:.1f}" if name == "tregjax" else "-",
                         f"{best / sec:.2f}x" if best else "n/a"])
  text = common.table(["mode", "framework", "median s / generate", "samples/s", "new tokens/s",
                       "first call / compile s", "speed vs fastest torch"], table_rows)
  agreement = ""
  if "tokens_equal_fraction" in results["modes"].get("greedy", {}):
    g = results["modes"]["greedy"]
    agreement = (f" Greedy tokens identical to transformers: {g['tokens_equal_fraction']:.1%} "
                 f"(first 16 per row: {g['tokens_equal_first_16']:.1%}).")
  probe_s = ", ".join(f"{t} thr {s:.2f} s" for t, s in probe.items())
  probe_text = f" torch at the faster thread count in a probe ({probe_s})." if probe else ""
  print(f"{desc}; {device}")
  print(text)
  if agreement or probe_text:
    print((agreement + probe_text).strip())
  shape = "_smollm2_shape" if args.weights == "random" and args.shape == "smollm2" else ""
  key = (f"decode_{args.weights}{shape}_{args.dtype}_{backend}_b{args.batch}x{args.samples}"
         + (f"_p{args.prompt}" if args.weights == "random" else "") + f"_n{args.new}")
  print(f"wrote {common.write_json(key, results)}")
  cmd = (f"python bench/decode.py {common.weights_flags(args)}"
         + (f" --prompt {args.prompt}" if args.weights == "random" else "")
         + f" --batch {args.batch} --samples {args.samples} --new {args.new} --modes {args.modes} --dtype {args.dtype}"
         f" --repeats {args.repeats}" + (f" --torch-threads {args.torch_threads}" if run_torch else " --skip-torch"))
  common.update_results(key, (
      f"### KV-cache decoding ({desc}, {backend})\n\n`{cmd}` ({common.today()}, {device}; median of {args.repeats}, "
      f"round-robin; prefill included, compile excluded).{agreement}{probe_text}\n\n{text}\n"))


if __name__ == "__main__":
  main()
