"""Tokenization with the model's own local tokenizer and chat template.

Prompt ids come from the chat template with the generation prompt; response ids are tokenized on their own and
appended, followed by the end-of-turn token. A joined string is never re-tokenized: response token t is the same id
under the plain prompt and under the contrastive ones, which T-REG's per-token comparison relies on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import transformers

# End-of-turn markers of common chat templates, tried in order when `end_of_turn_token` is not set.
_KNOWN_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class ChatTokenizer:
  """A local HF tokenizer directory + its chat template; `path` must hold tokenizer files (no hub lookups)."""

  def __init__(self, path: str, end_of_turn_token: str = ""):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    self.path = path
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(self.tokenizer, "chat_template", None):
      raise ValueError(f"tokenizer at {path} has no chat_template")
    self.end_of_turn_id = self._end_of_turn_id(end_of_turn_token)
    pad = self.tokenizer.pad_token_id
    self.pad_id = int(pad) if pad is not None else 0

  def _end_of_turn_id(self, token: str) -> int:
    vocab = self.tokenizer.get_vocab()
    if token:
      if token not in vocab:
        raise ValueError(f"end_of_turn_token {token!r} is not in the vocabulary of {self.path}")
      return int(vocab[token])
    template = self.tokenizer.chat_template
    for candidate in _KNOWN_END_OF_TURN:
      if candidate in vocab and candidate in template:
        return int(vocab[candidate])
    if self.tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer at {self.path} has no eos token; set data.end_of_turn_token")
    return int(self.tokenizer.eos_token_id)

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
    """Template-rendered prompt with the generation prompt (ready for the assistant's first token)."""
    text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def response_ids(self, text: str) -> list[int]:
    """The response tokenized on its own, plus the end-of-turn id."""
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.end_of_turn_id]

  def supports_system_role(self) -> bool:
    try:
      self.tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                         tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja raises TemplateError (e.g. Gemma's "System role not supported").
      return False
    return True


def with_instruction(messages: Sequence[dict[str, str]], instruction: str, role: str) -> list[dict[str, str]]:
  """The prompt wrapped with a contrastive instruction, as a system message or a prefix of the first user turn.

  role "system": merged into an existing system message (instruction first) or inserted as one;
  role "user": prefixed to the first user message (for templates without a system role).
  """
  messages = [dict(m) for m in messages]
  if role == "system":
    if messages and messages[0]["role"] == "system":
      messages[0]["content"] = f"{instruction}\n\n{messages[0]['content']}"
    else:
      messages.insert(0, {"role": "system", "content": instruction})
    return messages
  if role == "user":
    for m in messages:
      if m["role"] == "user":
        m["content"] = f"{instruction}\n\n{m['content']}"
        return messages
    raise ValueError("prompt has no user message to prefix the instruction to")
  raise ValueError(f"instruction role must be 'system' or 'user', got {role!r}")


@dataclasses.dataclass(frozen=True)
class TruncationOptions:
  """`policy`: "truncate" keeps the prompt's last `max_prompt_length` tokens and cuts responses to fit
  `max_length`; "drop" skips over-long pairs (counted); "error" makes them bad records (prompt longer than the budget).
  """
  max_prompt_length: int
  max_length: int
  policy: str = "truncate"

  def __post_init__(self):
    if self.policy not in ("truncate", "drop", "error"):
      raise ValueError(f"data.truncation must be truncate, drop or error, got {self.policy!r}")
    if not 0 < self.max_prompt_length < self.max_length:
      raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
