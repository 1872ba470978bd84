"""KV-cache decoding throughput: tregjax `decoding.generate` (the sampler of `tregjax.generate`) vs the sampler of
main before #30 vs transformers `generate`, same weights, same prompts, one run, against a roofline.

    python bench/decode.py --weights random [--layers 4] [--width 512] [--ffn F] [--vocab 32000] [--shape llama|smollm2]
                           [--prompt 64]
    python bench/decode.py --weights smollm2
        common: [--batch 4] [--samples 1] [--new 64] [--modes greedy,sampled] [--dtype f32|bf16] [--repeats 3]
                [--torch-threads 0,1|probe] [--skip-torch] [--eos] [--no-legacy]

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

`tregjax (main before #30)` is the sampler this issue replaced, rebuilt here from decoding's prefill / forward: every
row prefilled, top-p by 31 bisection passes + Gumbel noise over [rows, V], no finished-row compaction. `--eos`: rows
stop at the model's EOS ids in both tregjax variants (transformers keeps min_new_tokens; its rows are not timed
then), so finished-row compaction has work; tokens/s then counts the tokens actually generated.

Roofline: model FLOPs (`tregjax.training.metrics.forward_flops_per_token` at each token's position) of the new tokens
plus each DISTINCT prompt's tokens once (prefix sharing), over the dense f32 {--matmul}^3 matmul rate of jax measured
round-robin in the same run. "share of roofline" = roofline seconds / measured seconds.
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
  parser.add_argument("--prompts", choices=["chat", "distinct", "arith"], default="chat",
                      help="GGUF weights: chat prompts (8 texts, cycled: prefix sharing finds 8 distinct prompts), "
                           "distinct chat prompts (each of the 8 texts with its own request number), or the SmolLM2 "
                           "arith experiment's training problems")
  parser.add_argument("--chunk", type=int, default=0,
                      help="rows per generate call (the arith experiment's sample_batch_size 64, prompts padded to its "
                           "64-token bucket); 0: all rows in one call")
  parser.add_argument("--top-p", type=float, default=0.95, help="sampled mode's top-p (temperature 0.8)")
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--eos", action="store_true", help="rows stop at EOS (tregjax variants only)")
  parser.add_argument("--no-legacy", action="store_true", help="skip the sampler of main before #30")
  parser.add_argument("--profile-steps", type=int, default=8,
                      help="decode steps timed one by one for the breakdown (forward / sampling); 0: none")
  parser.add_argument("--matmul", type=int, default=2048, help="n of the n x n x n reference matmul")
  parser.add_argument("--compile-cache", default="",
                      help="a persistent jax compilation cache directory. With --aot: compile every jitted shape of "
                           "the run into it (the warm-up calls only) and exit; run that first, outside the timing "
                           "slot. Without --aot: the warm-up calls load their compiles from it instead of compiling "
                           "(a timing run's slot then holds the timed calls, one warm-up run each and tracing)")
  parser.add_argument("--aot", action="store_true", help="see --compile-cache")
  parser.add_argument("--torch-threads", default="0,1",
                      help="torch thread counts to time (0: torch's default), or 'probe': the faster of 1 and all")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top

  if args.aot and not args.compile_cache:
    parser.error("--aot needs --compile-cache DIR")
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  warm = True  # warm-up calls (compiling, or loading compiles from --compile-cache) before the timed round

  sampled = dict(temperature=SAMPLED["temperature"], top_p=args.top_p)
  gguf = args.weights in common.GGUF_WEIGHTS
  backend = jax.default_backend()
  device = common.device()
  run_torch = backend == "cpu" and not args.skip_torch and not args.eos and not args.aot
  modes = args.modes.split(",")
  # --aot loads the same way as the timing run (random weights: through transformers), so the programs match.
  model, torch_model, vocab, desc = common.load_models(args, args.dtype, run_torch or (args.aot and not gguf))
  if gguf and args.prompts == "arith":
    from tregjax.models.gguf import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
    from tregjax.tasks import arith  # pylint: disable=g-import-not-at-top
    tok = tokenizer_from_gguf(common.gguf_path(args.weights))
    train, _ = arith.make_splits(args.batch, 0, 0, (1, 2), max_operand=20)  # the experiment's defaults
    prompts = [tok(tok.apply_chat_template(arith.prompt_messages(p), tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for p in train]
    desc += f", the arith experiment's first {args.batch} training problems ({min(map(len, prompts))}-{max(map(len, prompts))} tokens)"
  elif gguf and args.prompts == "distinct":
    from tregjax.models.gguf import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
    tok = tokenizer_from_gguf(common.gguf_path(args.weights))
    texts = [f"{common.PROMPTS[i % len(common.PROMPTS)]} (Request {i + 1}.)" for i in range(args.batch)]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for t in texts]
    desc += f", {args.batch} distinct chat prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
  elif gguf:
    prompts = common.chat_prompt_ids(args.batch, args.weights)
    desc += f", {args.batch} chat prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
  else:
    prompts = np.random.default_rng(0).integers(3, vocab, (args.batch, args.prompt)).tolist()
    desc += f"; {args.batch} prompts of {args.prompt} tokens"
  rows = [p for p in prompts for _ in range(args.samples)]  # tregjax.generate's (prompt, sample) rows
  desc += (f" x {args.samples} samples = {len(rows)} rows, {args.new} new tokens each, "
           + ("stop at EOS" if args.eos else "no EOS") + f", {args.dtype}, "
           + ", ".join(m + (f" (temperature 0.8, top-p {args.top_p:g})" if m == "sampled" else "") for m in modes))

  eos = {}
  if args.eos:
    from tregjax.models.gguf import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
    tok = tokenizer_from_gguf(common.gguf_path(args.weights))
    eos = {"eos_ids": tuple(sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}))}
  generated = {}
  chunk = args.chunk or len(rows)
  chunks = [(i, rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
  if args.chunk:
    desc += f", {args.chunk} rows per call (prompts padded to 64)"
  multiple = 64 if args.chunk else 8

  def ours(kw, refill=True, name="tregjax"):
    # as generate.generate_shard: every row in one call of `chunk` slots, row ids = row index; refill=False: the
    # rows in batches of `chunk` one after another (#30's first session: compaction only)
    out = decoding.generate(model, rows, max_new_tokens=args.new, key=jax.random.key(0), **kw, **eos,
                            prompt_multiple=multiple, batch_size=chunk, refill=refill)
    generated[name] = np.asarray(out.lengths)
    generated[name + "_tokens"] = np.asarray(out.tokens)
    return generated[name + "_tokens"]

  def legacy(kw):
    lengths = []
    for _, part in chunks:
      part = part + [part[0]] * (chunk - len(part))  # the same compiled shape for every call
      _, n = legacy_generate(model, part, args.new, jax.random.key(0), eos.get("eos_ids", ()), multiple, **kw)
      lengths.append(np.asarray(n)[:len(part)])
    generated["legacy"] = np.concatenate(lengths)[:len(rows)]

  mat = jnp.ones((args.matmul, args.matmul), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(mat))
  cfg = model.config
  distinct = {tuple(p) for p in prompts}
  prompt_flops = sum(metrics.forward_flops_per_token(cfg, i + 1) for p in distinct for i in range(len(p)))

  def new_flops(lengths):  # row r's j-th new token attends to len(prompt_r) + j + 1 positions
    return sum(metrics.forward_flops_per_token(cfg, len(p) + j + 1) for p, n in zip(rows, lengths) for j in range(n))

  # The breakdown: prefill of the distinct prompts, then `--profile-steps` decode steps (forward + unembed) and
  # sampling steps at the full batch, each timed on its own (per-step figures; x new for a call's share).
  graphdef, state = nnx.split(model)
  layer_weights = decoding.per_layer_weights(model)
  first_distinct = list(dict.fromkeys(tuple(p) for p in chunks[0][1]))  # the profile is of one (the first) call
  p_tokens, p_lengths = decoding.pad_prompts([list(p) for p in first_distinct], 0, multiple)
  # generate's prefill batch: the smallest bucket that holds the distinct prompts. (Until 2026-12-07 20:15 UTC this
  # took the FIRST bucket >= them, the largest: the breakdown timed a 64-row prefill for 8 distinct prompts, 8x the
  # work generate does, and read it as "prefill 9x its roofline".) The every-row prefill of main before #30 (and of
  # the breakdown's old bug) is timed beside it.
  p_size = min((s for s in decoding.batch_buckets(chunk) if s >= len(first_distinct)), default=chunk)
  pad_rows = lambda a, n: np.concatenate([a, np.repeat(a[:1], n - len(a), 0)])
  all_tokens, all_lengths = decoding.pad_prompts(chunks[0][1], 0, multiple)
  all_tokens, all_lengths = pad_rows(all_tokens, chunk), pad_rows(all_lengths, chunk)
  p_tokens, p_lengths = pad_rows(p_tokens, p_size), pad_rows(p_lengths, p_size)
  max_len = p_tokens.shape[1] + args.new
  sample_fn = jax.jit(lambda lg, k: decoding.sample_logits(lg, k, **sampled))

  def prefill(size, tokens, lengths):
    t0 = time.perf_counter()
    cache = decoding.init_cache(model, size, max_len)
    logits, cache = decoding.prefill_step(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                          layer_weights)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0

  def profile():
    t_prefill = prefill(p_size, p_tokens, p_lengths)
    t_prefill_all = prefill(chunk, all_tokens, all_lengths) if p_size != chunk else t_prefill
    cache = decoding.init_cache(model, chunk, max_len)
    cache = cache.replace(index=jnp.full((chunk,), max_len // 2, jnp.int32))
    token = jnp.zeros((chunk,), jnp.int32)
    keys = decoding.row_keys(jax.random.key(0), jnp.arange(chunk))
    fwd, smp = [], []
    for _ in range(args.profile_steps + 1):  # the first step of each compiles (dropped)
      t0 = time.perf_counter()
      logits, cache = decoding.decode_step_split(graphdef, state, cache, token, layer_weights)
      jax.block_until_ready(logits)
      fwd.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(sample_fn(logits, keys))
      smp.append(time.perf_counter() - t0)
    return t_prefill, float(np.median(fwd[1:])), float(np.median(smp[1:])), t_prefill_all

  thread_counts, probe = [], {}
  if run_torch:
    import torch  # pylint: disable=g-import-not-at-top
    width = max(len(p) for p in rows)
    if gguf:
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
        theirs(sampled, threads, new=4)()
        t0 = time.perf_counter()
        theirs(sampled, threads, new=8)()
        probe[threads] = time.perf_counter() - t0
      thread_counts = [min(probe, key=probe.get)]
    else:
      default_threads = torch.get_num_threads()
      thread_counts = list(dict.fromkeys(int(t) or default_threads for t in args.torch_threads.split(",")))

  names = {"tregjax": "tregjax" + (f" (continuous batching, {chunk} slots)" if args.chunk else ""),
           "norefill": f"tregjax, no refill (calls of {chunk} rows one after another; #30 before refill)",
           "legacy": "tregjax (main before #30)"}
  results = {"date": common.today(), "device": device, "backend": backend, "args": vars(args),
             "prompt_lengths": [len(p) for p in prompts], "torch_thread_probe_s": probe, "modes": {}}
  table_rows, notes = [], []
  for mode in modes:
    kw = {"greedy": {}, "sampled": sampled}[mode]
    jitted = (decoding.generate_loop, decoding.admit, decoding.take_rows)
    before = [f._cache_size() for f in jitted]  # pylint: disable=protected-access
    first_s = legacy_first_s = None
    if warm:
      t0 = time.perf_counter()
      ours(kw)  # the first call traces and compiles prefill + the decode loop(s)
      first_s = time.perf_counter() - t0
    compiled = [f._cache_size() - b for f, b in zip(jitted, before)]  # pylint: disable=protected-access

    def ours_timed(kw=kw):
      ours(kw)
      if not warm and not compiled[0]:  # no warm-up: the first timed call traces and loads the compiles
        compiled[:] = [f._cache_size() - b for f, b in zip(jitted, before)]  # pylint: disable=protected-access
    runners = {"tregjax": ours_timed}
    if args.chunk and len(chunks) > 1:
      if warm:
        ours(kw, refill=False, name="norefill")  # compile
      runners["norefill"] = lambda kw=kw: ours(kw, refill=False, name="norefill")
    if not args.no_legacy:
      if warm:
        t0 = time.perf_counter()
        legacy(kw)  # compile
        legacy_first_s = time.perf_counter() - t0
      runners["legacy"] = lambda kw=kw: legacy(kw)
    mm_s = []

    def matmul():  # the best of 5 back-to-back calls: the rate the roofline may assume
      for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(mat))
        mm_s.append(time.perf_counter() - t0)
    runners["matmul"] = matmul
    prof = []
    if args.profile_steps and mode == "sampled":
      profile()  # compiles prefill at the distinct prompts' shape, one decode step and the sampler
      runners["profile"] = lambda: prof.append(profile())
    if args.aot:
      print(f"{mode}: compiled into {args.compile_cache} (first calls: tregjax {first_s:.1f} s"
            + (f", main before #30 {legacy_first_s:.1f} s" if legacy_first_s else "") + ")")
      continue
    entry = results["modes"][mode] = {}
    ref = None
    if thread_counts:
      ref = theirs(kw, thread_counts[-1], new=args.new if mode == "greedy" else 4)()  # warm-up
      runners |= {f"torch_{t}": theirs(kw, t) for t in thread_counts}
    times = common.timed_interleaved(runners, args.repeats)
    entry["compiled"] = dict(zip(("decode_loop", "admit", "take_rows"), compiled))
    if "norefill_tokens" in generated:  # the same row keys: the same samples, whatever the batching
      entry["refill_samples_identical"] = bool(np.array_equal(generated["norefill_tokens"],
                                                              generated["tregjax_tokens"]))
      notes.append(f"{mode}: continuous batching vs calls one after another: samples token-for-token identical: "
                   f"{'yes' if entry['refill_samples_identical'] else 'NO'}.")
    if ref is not None and mode == "greedy":
      assert ref.shape == (len(rows), width + args.new), ref.shape
      same = ref[:, width:].numpy() == generated["tregjax_tokens"]
      entry["tokens_equal_fraction"] = float(same.mean())
      entry["tokens_equal_first_16"] = float(same[:, :16].mean())
    rate = 2.0 * args.matmul ** 3 / min(mm_s)
    entry["matmul_flops_per_s"] = rate
    for name, (sec, all_s) in times.items():
      if name in ("matmul", "profile"):
        continue
      lengths = generated.get(name, np.full(len(rows), args.new))  # torch: min_new_tokens = new
      flops = prompt_flops + new_flops(lengths)
      r = entry[name] = {"median_s": sec, "all_s": all_s, "new_tokens": int(lengths.sum()),
                         "tokens_per_s": int(lengths.sum()) / sec, "roofline_s": flops / rate,
                         "roofline_share": flops / rate / sec}
      if name == "tregjax" and first_s is not None:
        r.update(first_call_s=first_s, compile_s=first_s - sec)
      elif name == "legacy" and legacy_first_s is not None:
        r.update(first_call_s=legacy_first_s, compile_s=legacy_first_s - sec)
    torch_best = min((entry[k]["median_s"] for k in entry if k.startswith("torch_")), default=None)
    for name in (k for k in times if k not in ("matmul", "profile")):
      r = entry[name]
      label = names.get(name) or f"transformers generate (torch, {name.split('_')[1]} threads)"
      table_rows.append([mode, label, f"{r['median_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                         f"{r['roofline_s']:.1f} s ({r['roofline_share']:.0%})",
                         f"{r['first_call_s']:.1f} / {r['compile_s']:.1f}" if "compile_s" in r
                         else "-",
                         f"{torch_best / r['median_s']:.2f}x" if torch_best else "n/a",
                         f"{entry['legacy']['median_s'] / r['median_s']:.2f}x" if "legacy" in entry else "n/a",
                         f"{entry['norefill']['median_s'] / r['median_s']:.2f}x" if "norefill" in entry else "n/a"])
    if prof:
      t_pre, t_fwd, t_smp, t_all = (float(np.median(x)) for x in zip(*prof))
      ours_s = entry["tregjax"]["median_s"]
      steps = args.new * len(chunks)
      t_pre, t_all = t_pre * len(chunks), t_all * len(chunks)
      rest = ours_s - t_pre - steps * (t_fwd + t_smp)
      pre_flops = sum(metrics.forward_flops_per_token(cfg, i + 1)
                      for _, part in chunks for p in dict.fromkeys(map(tuple, part)) for i in range(len(p)))
      entry["profile"] = {"prefill_s": t_pre, "prefill_every_row_s": t_all, "prefill_rows": p_size,
                          "prefill_roofline_s": pre_flops / rate, "forward_step_s": t_fwd, "sample_step_s": t_smp,
                          "steps": steps, "rest_s": rest}
      notes.append(
          f"Prefill per call: the distinct prompts in a {p_size}-row batch (what generate runs) {t_pre:.2f} s vs "
          f"every row prefilled ({chunk} rows, main before #30) {t_all:.2f} s: {t_all / t_pre:.2f}x; the distinct "
          f"prompts' roofline {pre_flops / rate:.2f} s ({pre_flops / rate / t_pre:.0%} of it reached).")
      notes.append(
          f"Where tregjax's {mode} call goes ({ours_s:.2f} s; steps timed one by one at the full {chunk}-row "
          f"batch, x {steps} steps, an upper bound under EOS compaction): prefill of the distinct "
          f"prompts {t_pre:.2f} s ({t_pre / ours_s:.0%}), forward {t_fwd * 1e3:.0f} ms/step = "
          f"{steps * t_fwd:.2f} s ({steps * t_fwd / ours_s:.0%}), sampling {t_smp * 1e3:.1f} ms/step = "
          f"{steps * t_smp:.2f} s ({steps * t_smp / ours_s:.0%}), rest (cache copies, compaction, host) "
          f"{rest:.2f} s ({rest / ours_s:.0%}).")
    notes.append(f"{mode}: compiles in tregjax's first call" + (" (loaded from --compile-cache)" if args.compile_cache else "")
                 + f": {compiled[0]} decode loop(s), {compiled[1]} admit(s) (prefill + refill of slots), "
                 f"{compiled[2]} compaction gather(s)" + (f"; rows generated {entry['tregjax']['new_tokens']} of "
                                                   f"{len(rows) * args.new} tokens" if args.eos else "") + ".")
  if args.aot:
    return
  text = common.table(["mode", "sampler", "median s / call", "new tokens/s", "roofline (share)",
                       "first call / compile s", "speed vs fastest torch", "speed vs main before #30",
                       "speed vs no refill"], table_rows)
  agreement = ""
  if "tokens_equal_fraction" in results["modes"].get("greedy", {}):
    g = results["modes"]["greedy"]
    agreement = (f" Greedy tokens identical to transformers: {g['tokens_equal_fraction']:.1%} "
                 f"(first 16 per row: {g['tokens_equal_first_16']:.1%}).")
  probe_s = ", ".join(f"{t} thr {s:.2f} s" for t, s in probe.items())
  probe_text = f" torch at the faster thread count in an 8-token probe ({probe_s})." if probe else ""
  rate_s = results["modes"][modes[0]]["matmul_flops_per_s"]
  probe_text += (f" Roofline: {metrics.forward_flops_per_token(cfg, 128) / 1e6:.0f} MFLOP per token at position 128,"
                 f" {len(distinct)} distinct prompts prefilled once, over jax's f32 {args.matmul}^3 matmul rate "
                 f"{rate_s / 1e9:.0f} GFLOP/s measured round-robin in this run.")
  load = os.getloadavg()[0]
  print(f"{desc}; {device}; load avg {load:.2f} at the end")
  print(text)
  print((agreement + probe_text).strip())
  print("\n".join(notes))
  shape = "_smollm2_shape" if args.weights == "random" and args.shape == "smollm2" else ""
  key = (f"decode_{args.weights}{shape}_{args.dtype}_{backend}_b{args.batch}x{args.samples}"
         + (f"_p{args.prompt}" if args.weights == "random" else "") + f"_n{args.new}" + ("_eos" if args.eos else "")
         + (f"_topp{args.top_p:g}" if args.top_p != 0.95 else "") + (f"_{args.prompts}" if args.prompts != "chat" else "")
         + (f"_chunk{args.chunk}" if args.chunk else ""))
  print(f"wrote {common.write_json(key, results)}")
  cmd = (f"python bench/decode.py {common.weights_flags(args)}"
         + (f" --prompt {args.prompt}" if args.weights == "random" else "")
         + (f" --prompts {args.prompts}" if args.prompts != "chat" else "")
         + (f" --chunk {args.chunk}" if args.chunk else "")
         + (f" --profile-steps {args.profile_steps}" if args.profile_steps != 8 else "")
         + f" --batch {args.batch} --samples {args.samples} --new {args.new} --modes {args.modes} --dtype {args.dtype}"
         + (f" --top-p {args.top_p:g}" if args.top_p != 0.95 else "")
         + f" --repeats {args.repeats}" + (f" --torch-threads {args.torch_threads}" if run_torch else " --skip-torch")
         + (" --eos" if args.eos else "") + (" --no-legacy" if args.no_legacy else ""))
  common.update_results(key, (
      f"### KV-cache decoding ({desc}, {backend})\n\n`{cmd}` ({common.today()}, {device}, load avg {load:.2f} at the "
      f"end; median of {args.repeats}, round-robin; prefill included, compile excluded).{agreement}{probe_text}\n\n"
      f"{text}\n\n" + "\n".join(notes) + "\n"))


def legacy_generate(model, rows, new: int, key, eos_ids, multiple: int = 8, temperature: float = 0.0,
                    top_p: float = 1.0):
  """main's sampler before #30, for the comparison: every row prefilled, one fold_in(key, step) key per step, top-p by
  31 bisection passes, Gumbel-max sampling over [rows, V], the whole batch running until its last row ends."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
  tokens, lengths = decoding.pad_prompts(rows, 0, multiple)
  cache = decoding.init_cache(model, tokens.shape[0], tokens.shape[1] + new)
  graphdef, state = nnx.split(model)
  layer_weights = decoding.per_layer_weights(model)
  logits, cache = decoding.prefill_step(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                        layer_weights)
  return _legacy_loop(graphdef, state, cache, logits, key, new, float(temperature), float(top_p),
                      tuple(int(e) for e in eos_ids), layer_weights)


def _legacy_loop_impl(graphdef, state, cache, first_logits, key, new, temperature, top_p, eos_ids, layer_weights):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, state)
  b = first_logits.shape[0]
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def sample(logits, k):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / temperature
    if top_p < 1.0:
      x = jnp.where(common.legacy_nucleus(jax.nn.softmax(x, axis=-1), top_p), x, jnp.finfo(jnp.float32).min)
    return jax.random.categorical(k, x, axis=-1).astype(jnp.int32)

  def cond(c):
    return (c[0] < new) & ~jnp.all(c[3])

  def body(c):
    step, logits, cache, done, out, lengths = c
    token = jnp.where(done, 0, sample(logits, jax.random.fold_in(key, step)))
    out = out.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos)
    hidden, cache = decoding.forward_cached(model, token[:, None], cache, layer_weights)
    return step + 1, model.unembed(hidden[:, 0]), cache, done, out, lengths

  c = (jnp.int32(0), first_logits, cache, jnp.zeros((b,), bool), jnp.zeros((b, new), jnp.int32),
       jnp.zeros((b,), jnp.int32))
  _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, c)
  return out, lengths


_LEGACY = {}


def _legacy_loop(graphdef, state, cache, *rest):
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if "fn" not in _LEGACY:
    _LEGACY["fn"] = functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8), donate_argnums=2)(_legacy_loop_impl)
  return _LEGACY["fn"](graphdef, state, cache, *rest)


if __name__ == "__main__":
  main()
