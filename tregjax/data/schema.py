"""Map raw records of the three supported schemas to one `PreferenceExample` (prompt messages + two responses).

Schemas (`data.schema`), with field names from `data.fields`:
  "pair":   (a) `prompt` (string, or a list of chat messages), `chosen`, `rejected` strings.
  "chat":   (b) `chosen` / `rejected` chat message lists whose last message is the assistant response and whose
            earlier messages are the prompt (UltraFeedback-binarized style); both must share the same prompt. If the
            lists hold only the assistant message, the prompt comes from the `prompt` field.
  "ranked": (c) `prompt` + `responses` (list of strings) + `scores` (list of numbers, same length): the best and the
            worst response become chosen/rejected; a pair whose best and worst scores are equal is a tie, skipped
            and counted (not an error).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tregjax.config_schema import DATA_FIELDS as DEFAULT_FIELDS  # the data.fields defaults
from tregjax.data.sources import DataError

SCHEMAS = ("pair", "chat", "ranked")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """Strings, before tokenization. `prompt` is a chat message list ending with a user turn."""
  prompt: tuple[dict[str, str], ...]
  chosen: str
  rejected: str
  example_id: str


class Tie(Exception):
  """A ranked record whose best and worst scores are equal (skipped and counted, never an error)."""


def _get(record: dict[str, Any], name: str, where: str) -> Any:
  """A field's value; a missing field and a null one are different mistakes, so they say different things."""
  if name not in record:
    raise DataError(where, name, f"missing field (record has {sorted(record)})", "missing_field")
  if record[name] is None:
    raise DataError(where, name, "is null", "null_field")
  return record[name]


def _response_text(value: Any, where: str, field: str) -> str:
  if isinstance(value, dict) and "content" in value:
    value = value["content"]
  if value is None:
    raise DataError(where, field, "response is null", "null_field")
  if not isinstance(value, str):
    raise DataError(where, field, f"response must be a string, got {type(value).__name__}", "bad_response")
  if not value.strip():
    raise DataError(where, field, "empty response", "bad_response")
  return value


def _messages(value: Any, where: str, field: str) -> tuple[dict[str, str], ...]:
  """A prompt as chat messages: a string is one user turn."""
  if isinstance(value, str):
    if not value.strip():
      raise DataError(where, field, "empty prompt", "bad_prompt")
    return ({"role": "user", "content": value},)
  if isinstance(value, (list, tuple)) and value:
    out = []
    for i, m in enumerate(value):
      if isinstance(m, dict) and "content" in m and m["content"] is None:
        raise DataError(where, f"{field}[{i}].content", "is null", "null_field")
      if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
        raise DataError(where, f"{field}[{i}]", "chat message must be {'role': str, 'content': str}", "bad_prompt")
      out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)
  raise DataError(where, field, f"prompt must be a string or a list of chat messages, got {type(value).__name__}",
                  "bad_prompt")


def prompt_messages(record: dict[str, Any], field: str, where: str) -> tuple[dict[str, str], ...]:
  """A record's prompt (string or chat messages) as chat messages; DataError names `where` and `field` if bad."""
  return _messages(_get(record, field, where), where, field)


def _split_conversation(value: Any, where: str, field: str) -> tuple[tuple[dict[str, str], ...], str]:
  if not isinstance(value, (list, tuple)) or not value:
    raise DataError(where, field, f"expected a non-empty list of chat messages, got {type(value).__name__}",
                    "bad_response")
  messages = _messages(list(value), where, field)
  if messages[-1]["role"] != "assistant":
    raise DataError(where, field, f"last message must be the assistant's, got role {messages[-1]['role']!r}",
                    "bad_response")
  return messages[:-1], _response_text(messages[-1]["content"], where, f"{field}[-1].content")


def to_example(record: dict[str, Any], where: str, schema: str, fields: dict[str, str] | None = None,
               system_prompt: str = "") -> PreferenceExample:
  """One raw record -> PreferenceExample; raises DataError (bad record) or Tie (ranked, equal best/worst)."""
  f = dict(DEFAULT_FIELDS, **(fields or {}))
  if schema == "pair":
    prompt = prompt_messages(record, f["prompt"], where)
    chosen = _response_text(_get(record, f["chosen"], where), where, f["chosen"])
    rejected = _response_text(_get(record, f["rejected"], where), where, f["rejected"])
  elif schema == "chat":
    prompt, chosen = _split_conversation(_get(record, f["chosen"], where), where, f["chosen"])
    prompt_r, rejected = _split_conversation(_get(record, f["rejected"], where), where, f["rejected"])
    if prompt != prompt_r:
      raise DataError(where, f["rejected"], "the rejected conversation's prompt differs from the chosen one's",
                      "bad_prompt")
    if not prompt:
      prompt = prompt_messages(record, f["prompt"], where)
  elif schema == "ranked":
    prompt = prompt_messages(record, f["prompt"], where)
    responses = _get(record, f["responses"], where)
    scores = _get(record, f["scores"], where)
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
      raise DataError(where, f["responses"], "expected a list of at least two responses", "bad_response")
    if not isinstance(scores, (list, tuple)) or len(scores) != len(responses):
      raise DataError(where, f["scores"], f"expected a list of {len(responses)} scores (one per response)",
                      "bad_field")
    for i, s in enumerate(scores):
      if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise DataError(where, f"{f['scores']}[{i}]", f"score must be a finite number, got {s!r}", "bad_field")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first of the maxima
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))  # first of the minima
    if scores[best] == scores[worst]:
      raise Tie(where)
    chosen = _response_text(responses[best], where, f"{f['responses']}[{best}]")
    rejected = _response_text(responses[worst], where, f"{f['responses']}[{worst}]")
  else:
    raise ValueError(f"unknown data.schema {schema!r}; expected one of {SCHEMAS}")
  if chosen == rejected:
    raise DataError(where, f["rejected"] if schema != "ranked" else f["responses"],
                    "chosen == rejected (identical responses carry no preference)", "same_response")
  if system_prompt and prompt[0]["role"] != "system":
    prompt = ({"role": "system", "content": system_prompt},) + prompt
  example_id = where
  if f.get("id"):
    example_id = str(_get(record, f["id"], where))
  return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, example_id=example_id)
