"""A tiny synthetic world in which token-level credit assignment is measurable.

Prompts ask for a walk: "walk 17" means "start at 17 and follow the walk's successor table" (two tasks, `walk` and
`jump`, each a fixed random permutation of the number tokens). A response is 10 numbers; token t is *correct* iff it
is the task's successor of token t−1 (the first token: the successor of the start). An oracle therefore knows exactly
which tokens are errors, which real preference data never tells us.

The reference model is fine-tuned (SFT) on three kinds of demonstrations, each wrapped in the chat template:
- system "careful": error-free walks;
- system "sloppy": each token wrong with probability 0.5;
- no system message: each response with its own error rate p ~ U(0, max_plain_error) (the plain policy).
So under the two contrastive prompts of T-REG ("careful" vs "sloppy") the reference itself tells good tokens from bad
ones, exactly the self-refinement ability T-REG exploits, while preference pairs drawn from the plain policy only say
which whole response has fewer errors.

Metrics: the *error mass* of a policy, mean over positions of 1 − π(correct token | prompt, correct prefix), on held-out
prompts (teacher-forced, deterministic, no sampling); the *generated error rate*, the oracle's fraction of wrong
positions in the policy's own responses to the same prompts (greedy, and sampled at temperature 1); and the *token
credit AUC*: how well the implicit token reward β·(log π − log π_ref) ranks correct above erroneous tokens of
held-out responses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import ml_collections
import numpy as np

from tregjax import storage

PAD, EOS = "<pad>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, SYSTEM, USER, ASSISTANT]
TASKS = ("walk", "jump")
CAREFUL, SLOPPY = "careful", "sloppy"

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|end|> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def demo_section() -> ml_collections.ConfigDict:
  """Keys of `config.demo` (configs/demo.py sets them): the world and its SFT reference."""
  return ml_collections.ConfigDict(dict(
      num_symbols=32, response_length=10, world_seed=0, max_plain_error=0.4,
      sft_examples=6000, sft_steps=600, sft_lr=3e-3, sft_batch_size=64,
      train_pairs=2048, eval_pairs=256, eval_prompts=256))


@dataclasses.dataclass(frozen=True)
class World:
  """The world's rules: number of symbols, response length and each task's successor table."""
  num_symbols: int = 32
  response_length: int = 10
  seed: int = 0

  @property
  def successors(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(self.seed)
    return {task: rng.permutation(self.num_symbols) for task in TASKS}

  @property
  def words(self) -> list[str]:
    return SPECIAL_TOKENS + list(TASKS) + [CAREFUL, SLOPPY] + [str(i) for i in range(self.num_symbols)]

  def correct_response(self, task: str, start: int) -> np.ndarray:
    table = self.successors[task]
    out, current = [], start
    for _ in range(self.response_length):
      current = int(table[current])
      out.append(current)
    return np.asarray(out)

  def token_errors(self, task: str, start: int, response: np.ndarray) -> np.ndarray:
    """Boolean [len] array: token t is an error iff it is not the successor of token t−1 (or of the start)."""
    table = self.successors[task]
    previous = np.concatenate([[start], response[:-1]])
    return response != table[previous]

  def generated_errors(self, task: str, start: int, words: list[str]) -> np.ndarray:
    """Boolean [response_length] for a *generated* response (words, end-of-turn excluded): position t is an error
    unless it holds the successor of the symbol at t−1 (or of the start); a non-symbol word, a symbol after a
    non-symbol, and a missing position (the response ended early) are errors."""
    table = self.successors[task]
    symbols = {str(i): i for i in range(self.num_symbols)}
    errors = np.ones(self.response_length, bool)
    previous = start
    for t, word in enumerate(words[:self.response_length]):
      current = symbols.get(word)
      errors[t] = previous is None or current is None or current != table[previous]
      previous = current
    return errors

  def corrupt(self, task: str, start: int, error_rate: float, rng: np.random.Generator) -> np.ndarray:
    """A walk in which each step is replaced by a wrong symbol with probability `error_rate` (and continues from it)."""
    table = self.successors[task]
    out, current = [], start
    for _ in range(self.response_length):
      nxt = int(table[current])
      if rng.random() < error_rate:
        nxt = int((nxt + rng.integers(1, self.num_symbols)) % self.num_symbols)
      out.append(nxt)
      current = nxt
    return np.asarray(out)


def prompt_text(task: str, start: int) -> str:
  return f"{task} {start}"


def response_text(response: np.ndarray) -> str:
  return " ".join(str(int(t)) for t in response)


def write_tokenizer(world: World, out_dir: str) -> str:
  """A word-level Hugging Face tokenizer with the world's chat template, built locally with `tokenizers`."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {word: i for i, word in enumerate(world.words)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                 additional_special_tokens=[SYSTEM, USER, ASSISTANT])
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return out_dir


def _messages(system: str | None, prompt: str, response: str | None = None) -> list[dict]:
  msgs = [] if system is None else [{"role": "system", "content": system}]
  msgs.append({"role": "user", "content": prompt})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def _prompts(world: World, count: int, rng: np.random.Generator) -> Iterator[tuple[str, int]]:
  for _ in range(count):
    yield TASKS[rng.integers(len(TASKS))], int(rng.integers(world.num_symbols))


def sft_records(world: World, count: int, max_plain_error: float, seed: int) -> list[dict]:
  """Demonstrations for the reference: careful, sloppy and plain (mixed error rate) in equal parts."""
  rng = np.random.default_rng(seed)
  records = []
  for i, (task, start) in enumerate(_prompts(world, count, rng)):
    kind = i % 3
    if kind == 0:
      system, rate = CAREFUL, 0.0
    elif kind == 1:
      system, rate = SLOPPY, 0.5
    else:
      system, rate = None, float(rng.uniform(0.0, max_plain_error))
    response = world.corrupt(task, start, rate, rng)
    messages = _messages(system, prompt_text(task, start))
    records.append({"prompt": messages, "response": response_text(response)})
  return records


def preference_records(world: World, count: int, max_plain_error: float, seed: int) -> list[dict]:
  """Pairs of plain-policy responses; chosen has fewer errors (ties are resampled). Schema (a) + oracle fields."""
  rng = np.random.default_rng(seed)
  records = []
  for task, start in _prompts(world, count, rng):
    while True:
      a = world.corrupt(task, start, float(rng.uniform(0.0, max_plain_error)), rng)
      b = world.corrupt(task, start, float(rng.uniform(0.0, max_plain_error)), rng)
      ea, eb = int(world.token_errors(task, start, a).sum()), int(world.token_errors(task, start, b).sum())
      if ea != eb:
        break
    chosen, rejected = (a, b) if ea < eb else (b, a)
    records.append({
        "prompt": prompt_text(task, start),
        "chosen": response_text(chosen),
        "rejected": response_text(rejected),
        "chosen_errors": min(ea, eb),
        "rejected_errors": max(ea, eb),
    })
  return records


def write_jsonl(records: list[dict], path: str) -> str:
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
  return path
