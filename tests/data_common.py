"""Test helpers for the data/score tests: tiny local HF tokenizer directories built with `tokenizers` (no hub)."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is two plus two? Two plus two is four.",
    "Please answer helpfully, correctly, coherently and concisely.",
    "Be unhelpful, incorrect, incoherent and verbose.", "You are a helpful assistant.",
    "Explain why the sky is blue in one sentence.", "Rayleigh scattering makes short wavelengths scatter more.",
    "I don't know, maybe because of the ocean or something else entirely.", "Ünïcode ñ 日本語 emoji 🙂 test.",
    "def add(a, b): return a + b", "1 2 3 4 5 6 7 8 9 10 11 12",
]

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2 style: BOS rendered by the template, system in <<SYS>>, the response ends with </s>.
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
                 "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


def _save(tok: Tokenizer, path: str, template: str, **special) -> str:
  os.makedirs(path, exist_ok=True)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  fast.chat_template = template
  fast.save_pretrained(path)
  return path


def byte_level_bpe(path: str, vocab_size: int = 400) -> str:
  """A GPT-2/Llama-3 style byte-level BPE with ChatML specials; <|im_end|> ends a turn."""
  specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  return _save(tok, path, CHATML_TEMPLATE, pad_token="<pad>", eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def metaspace_unigram(path: str, vocab_size: int = 300) -> str:
  """A sentencepiece-style tokenizer (Metaspace ▁ prefix, Unigram model) with <s>/</s> and [INST] turns."""
  specials = ["<pad>", "<unk>", "<s>", "</s>"]
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  chars = sorted(set("".join(CORPUS)) | set("[]<>/SYINT_"))
  trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                    initial_alphabet=chars, show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  return _save(tok, path, INST_TEMPLATE, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def write_jsonl(path: str, records: list) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return path


def pair_records(n: int, seed: int = 0) -> list[dict]:
  """Schema (a) records with varied lengths (deterministic)."""
  import random
  rng = random.Random(seed)
  words = " ".join(CORPUS).split()
  out = []
  for i in range(n):
    def text(k):
      return " ".join(rng.choice(words) for _ in range(k))
    prompt = f"Question {i}: " + text(rng.randint(1, 12))
    chosen = text(rng.randint(1, 20))
    rejected = text(rng.randint(1, 20)) + " no"
    out.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
  return out
