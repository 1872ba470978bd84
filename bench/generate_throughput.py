"""On-policy sampling throughput: tregjax's KV-cache sampler vs transformers `generate` (torch CPU), same tiny model.

Usage: python bench/generate_throughput.py [--prompts 4] [--samples 4] [--prompt-len 32] [--new 64] [--repeats 3]

One random Llama (HF `LlamaForCausalLM`, default 4 layers, width 256, vocab 8192) is saved once and loaded by both
frameworks in float32. Both decode the same `prompts x samples` rows of `prompt-len` random prompt ids for exactly
`new` tokens (no EOS, so the work is equal), greedy and sampled (temperature 0.8, top-p 0.95), as one batch each:
tregjax exactly as `tregjax.generate` batches its (prompt, sample) rows (`tregjax.models.decoding.generate`, prefill +
one jitted while-loop), transformers with the same rows. Greedy outputs are compared token by token.

Fairness on a shared CPU: torch runs at the thread count that a short probe finds fastest (1 or all cores: an
oversubscribed machine makes multi-threaded torch collapse), and the variants are timed round-robin so that they see
the same load. Compile time is reported separately. Prints a table, writes bench/out/generate_throughput_p<P>_n<N>.json and
updates the section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smollm2_common import machine, table, timed_interleaved, today, update_results, write_json
from tregjax import models
from tregjax.models import decoding

SAMPLED = dict(temperature=0.8, top_p=0.95)


def _probe_torch_threads(fn) -> tuple[int, dict[int, float]]:
  """The faster of 1 and all threads on a short run of `fn` (seconds per call, after a warm-up each)."""
  seconds = {}
  for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    fn()
    t0 = time.perf_counter()
    fn()
    seconds[threads] = time.perf_counter() - t0
  return min(seconds, key=seconds.get), seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
                    num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                    num_key_value_heads=args.width // 64, max_position_embeddings=1024, pad_token_id=0,
                    bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  hf = LlamaForCausalLM(cfg).eval()
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, args.vocab, (args.prompts, args.prompt_len)).tolist()
  rows = [p for p in prompts for _ in range(args.samples)]  # tregjax.generate's (prompt, sample) rows
  n_rows = len(rows)
  ids = torch.tensor(rows)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model = models.from_pretrained(tmp, dtype=np.float32, param_dtype=np.float32)

  def ours(kw, new=args.new):
    return jax.block_until_ready(decoding.generate(model, rows, max_new_tokens=new, key=jax.random.key(0), **kw))

  @torch.no_grad()
  def theirs(kw, new=args.new):
    sampling = {"temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": 0} if kw else {}
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=bool(kw), pad_token_id=0, **sampling)

  threads, probe = _probe_torch_threads(lambda: theirs(SAMPLED, new=8))
  torch.set_num_threads(threads)
  results, agree = [], None
  for mode, kw in (("greedy", {}), ("sampled", SAMPLED)):
    t0 = time.perf_counter()
    out = ours(kw)  # the first call traces and compiles
    first_s = time.perf_counter() - t0
    assert int(np.asarray(out.lengths).min()) == args.new
    gen = theirs(kw)
    assert gen.shape == (n_rows, args.prompt_len + args.new)
    if mode == "greedy":
      agree = float(np.mean(np.asarray(out.tokens) == gen[:, args.prompt_len:].numpy()))
    timings = timed_interleaved({"tregjax": lambda kw=kw: ours(kw), "torch": lambda kw=kw: theirs(kw)}, args.repeats)
    torch_s = timings["torch"][0]
    for name, (sec, _) in timings.items():
      results.append(dict(mode=mode, framework=name, seconds=sec, samples_per_s=n_rows / sec,
                          decode_tokens_per_s=n_rows * args.new / sec,
                          compile_s=first_s - sec if name == "tregjax" else None, speedup_vs_torch=torch_s / sec))

  headers = ["mode", "framework", "median s", "samples/s", "decode tokens/s", "compile s", "speed vs torch"]
  body = [[r["mode"], "tregjax" if r["framework"] == "tregjax" else f"transformers (torch, {threads} thr)",
           f"{r['seconds']:.3f}", f"{r['samples_per_s']:.1f}", f"{r['decode_tokens_per_s']:.0f}",
           f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-", f"{r['speedup_vs_torch']:.2f}x"]
          for r in results]
  text = table(headers, body)
  print(text)
  when, where = today(), machine()
  probe_text = ", ".join(f"{t} thr {s:.2f} s" for t, s in probe.items())
  name = f"generate_throughput_p{args.prompt_len}_n{args.new}"  # one RESULTS.md section per length setting
  write_json(name, dict(args=vars(args), machine=where, date=when, torch_threads=threads, torch_thread_probe_s=probe,
                        greedy_token_agreement=agree, results=results))
  cmd = (f"python bench/generate_throughput.py --prompts {args.prompts} --samples {args.samples} "
         f"--prompt-len {args.prompt_len} --new {args.new} --layers {args.layers} --width {args.width} "
         f"--vocab {args.vocab} --repeats {args.repeats}")
  update_results(name, f"""### On-policy sampling throughput, {args.prompt_len} prompt + {args.new} new tokens (tregjax.generate sampler vs transformers generate)

`{cmd}` ({when}, {where}; float32; random Llama {args.layers} layers, width {args.width}, vocab {args.vocab};
{args.prompts} prompts x {args.samples} samples = {n_rows} rows of {args.prompt_len} prompt tokens, {args.new} new
tokens each, no EOS; sampled = temperature 0.8, top-p 0.95; median of {args.repeats}, round-robin; torch at {threads}
thread(s), the faster in a probe ({probe_text}); greedy tokens identical to transformers: {100 * agree:.1f}%;
compile time excluded from the median and listed separately).

{text}
""")


if __name__ == "__main__":
  main()
