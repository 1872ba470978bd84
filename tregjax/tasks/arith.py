"""Arithmetic word problems with an oracle that knows sequence-level and token-level truth.

A real-model T-REG experiment needs responses whose *tokens* can be graded without a human: small instruct models
(SmolLM2-135M-Instruct) answer a word problem by writing explicit equations such as "29 + 14 = 43", and they often
get some of them wrong. The oracle here
- generates seeded, unique problems with 1-3 operations (+, -, x and exact division; no negative intermediate);
- grades a response as a whole: its final stated number against the true answer (`sequence_reward`);
- grades its tokens: every explicit equation "a op b (op c ...) = r" is evaluated, and the characters of its stated
  result r are marked correct (+1) or wrong (-1); the final answer's digits are marked by whether they equal the true
  answer (`char_labels`; a response cut by its token budget has no final answer to mark). Labels move to exactly
  the response token ids through the tokenizer's own offsets, never by matching strings (`token_truth`).
Unlabelled text (prose, operands) gets 0: the oracle only claims what it can check.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

SYSTEM_CAREFUL = (
    "You are a careful, patient maths tutor. Solve the problem step by step. Write every calculation as an explicit "
    "equation, for example 12 + 7 = 19, and check each result twice before you use it. When you are sure, end with "
    "\"The answer is N.\" where N is the final number.")
SYSTEM_CARELESS = (
    "You are a careless, hasty helper who never checks anything. Skim the problem, guess the numbers quickly and "
    "write down whatever result comes to mind first, without verifying any calculation.")

# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------

NAMES = ("Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sofia", "Ravi", "Chloe", "Lucas", "Grace", "Kenji",
         "Zara", "Ben", "Nina", "Hugo", "Lily", "Sam", "Ivy")
OBJECTS = ("coins", "apples", "marbles", "stickers", "cards", "pencils", "shells", "cookies", "beads", "stamps")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"))
ITEMS = (("book", "books"), ("toy", "toys"), ("ticket", "tickets"), ("notebook", "notebooks"), ("plant", "plants"),
         ("ball", "balls"))
ACTIVITIES = ("reading", "drawing", "playing chess", "walking the dog", "practising the piano", "baking")

# A problem is a start (a plain amount, or a product) followed by steps on the running amount; the last step may be
# an exact division, which changes the question. Ops per kind: each kind's contribution to the level.
_OPS = {"plain": 0, "mul": 1, "add": 1, "sub": 1, "add_mul": 2, "sub_mul": 2, "div": 1}
# Operations per problem. Level 4 (#28) is the harder level for models that make too few errors at 1-3 to measure
# token credit (four steps on amounts up to 999, e.g. 7 * 38 - (4 * 23) + 45, then / 3).
LEVELS = (1, 2, 3, 4)
MAX_OPERAND = 60  # default largest operand (a container count is 2..12, a group 2..9 x 2..min(30, max_operand))
_MAX_TOTAL = 999  # running amounts and products stay below 1000


@dataclasses.dataclass(frozen=True)
class Problem:
  """One word problem: its text, true answer, number of operations and the ground-truth computation."""
  question: str
  answer: int
  level: int
  expression: str


@functools.lru_cache(maxsize=None)
def _plans(level: int) -> tuple[tuple[str, ...], ...]:
  """All step sequences with exactly `level` operations (start, up to 3 middle steps, optional final division)."""
  plans = []

  def extend(plan: tuple[str, ...], ops: int) -> None:
    if ops == level and plan != ("plain",):
      plans.append(plan)
    if ops < level and plan[-1] != "div":
      for kind in ("add", "sub", "add_mul", "sub_mul", "div"):
        if ops + _OPS[kind] <= level and len(plan) <= 3:
          extend(plan + (kind,), ops + _OPS[kind])

  extend(("plain",), 0)
  extend(("mul",), 1)
  return tuple(sorted(set(plans)))


class _Infeasible(Exception):
  """The drawn numbers cannot continue this plan (e.g. no exact divisor): draw the problem again."""


def _theme(rng: random.Random) -> dict[str, Any]:
  name, friend = rng.sample(NAMES, 2)
  container, containers = rng.choice(CONTAINERS)
  item, items = rng.choice(ITEMS)
  return dict(kind=rng.choice(("objects", "money", "minutes")), N=name, M=friend, obj=rng.choice(OBJECTS),
              container=container, containers=containers, item=item, items=items, activity=rng.choice(ACTIVITIES))


_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "objects": {
        "plain": ("{N} has {a} {obj}.", "{N} collects {a} {obj}."),
        "mul": ("{N} has {a} {containers} of {obj} with {b} {obj} in each {container}.",
                "{N} buys {a} {containers} of {obj}, and each {container} holds {b} {obj}."),
        "add": ("{N} finds {b} more {obj}.", "{M} gives {N} {b} more {obj}.", "{N} buys {b} more {obj}."),
        "sub": ("{N} gives {b} {obj} to {M}.", "{N} loses {b} {obj}.", "{N} sells {b} {obj}."),
        "add_mul": ("{N} buys {c} {containers} with {d} {obj} in each {container}.",
                    "{M} gives {N} {c} {containers} of {obj} with {d} {obj} in each {container}."),
        "sub_mul": ("{N} fills {c} {containers} with {d} {obj} each and gives them to {M}.",),
        "div": ("{N} shares all the {obj} equally among {b} friends.",),
        "q_div": ("How many {obj} does each friend get?",),
        "q_now": ("How many {obj} does {N} have now?",),
        "q_left": ("How many {obj} does {N} have left?",),
    },
    "money": {
        "plain": ("{N} has {a} dollars.", "{N} saved {a} dollars."),
        "mul": ("{N} works for {a} days and earns {b} dollars each day.",
                "{N} sells {a} {items} for {b} dollars each."),
        "add": ("{N} earns {b} more dollars.", "{M} gives {N} {b} dollars."),
        "sub": ("{N} spends {b} dollars on a {item}.", "{N} pays {M} {b} dollars."),
        "add_mul": ("{N} sells {c} {items} for {d} dollars each.",),
        "sub_mul": ("{N} buys {c} {items} that cost {d} dollars each.",),
        "div": ("{N} splits all the money equally into {b} envelopes.",),
        "q_div": ("How many dollars go into each envelope?",),
        "q_now": ("How many dollars does {N} have now?",),
        "q_left": ("How many dollars does {N} have left?",),
    },
    "minutes": {
        "plain": ("{N} has {a} minutes of free time.",),
        "mul": ("{N} has {a} breaks of {b} minutes each.",),
        "add": ("{N} gets {b} extra minutes of free time.",),
        "sub": ("{N} spends {b} minutes {activity}.",),
        "add_mul": ("{N} gets {c} more breaks of {d} minutes each.",),
        "sub_mul": ("{N} plays {c} games that take {d} minutes each.",),
        "div": ("{N} splits all of that time into {b} equal parts.",),
        "q_div": ("How many minutes long is each part?",),
        "q_now": ("How many minutes of free time does {N} have now?",),
        "q_left": ("How many minutes of free time does {N} have left?",),
    },
}


def _paren(expr: str) -> str:
  return f"({expr})" if " " in expr else expr


def _draw(rng: random.Random, level: int, hi: int) -> Problem:
  """One problem of `level` operations; raises _Infeasible when the drawn numbers do not fit the plan."""
  plan = rng.choice(_plans(level))
  theme = _theme(rng)
  phrases = _PHRASES[theme["kind"]]
  sentences: list[str] = []
  value, expr = 0, ""
  last: set[int] = set()
  for i, kind in enumerate(plan):
    nums: dict[str, int] = {}
    if kind == "plain":
      value = nums["a"] = rng.randint(min(10, hi) if "sub" in plan or "sub_mul" in plan else 2, hi)
      expr = str(value)
    elif kind == "mul":
      nums["a"], nums["b"] = rng.randint(2, min(12, hi)), rng.randint(2, hi)
      value, expr = nums["a"] * nums["b"], f"{nums['a']} * {nums['b']}"
    elif kind == "add":
      nums["b"] = rng.randint(2, hi)
      value, expr = value + nums["b"], f"{expr} + {nums['b']}"
    elif kind == "sub":
      if value < 3:
        raise _Infeasible
      nums["b"] = rng.randint(2, min(hi, value - 1))
      value, expr = value - nums["b"], f"{expr} - {nums['b']}"
    elif kind in ("add_mul", "sub_mul"):
      c = nums["c"] = rng.randint(2, min(9, hi))
      top = min(30, hi) if kind == "add_mul" else min(30, hi, (value - 1) // c)
      if top < 2:
        raise _Infeasible
      d = nums["d"] = rng.randint(2, top)
      sign = "+" if kind == "add_mul" else "-"
      value, expr = value + c * d if sign == "+" else value - c * d, f"{expr} {sign} ({c} * {d})"
    elif kind == "div":
      # exact, and not a number of the previous step: "(3 * 37) / 3" would only undo it
      divisors = [b for b in range(2, 13) if value % b == 0 and value // b >= 2 and b not in last]
      if not divisors:
        raise _Infeasible
      nums["b"] = rng.choice(divisors)
      value, expr = value // nums["b"], f"{_paren(expr)} / {nums['b']}"
    if not 1 <= value <= _MAX_TOTAL:
      raise _Infeasible
    last = set(nums.values())
    sentence = rng.choice(phrases[kind]).format(**theme, **nums)
    if i >= 2:
      sentence = "Then " + sentence  # every sentence starts with a name
    sentences.append(sentence)
  question_kind = "q_div" if plan[-1] == "div" else "q_left" if plan[-1] in ("sub", "sub_mul") else "q_now"
  sentences.append(rng.choice(phrases[question_kind]).format(**theme))
  return Problem(question=" ".join(sentences), answer=value, level=level, expression=expr)


def make_problems(count: int, seed: int, levels: Sequence[int] = (1, 2, 3), *,
                  max_operand: int = MAX_OPERAND) -> list[Problem]:
  """`count` unique problems, deterministic per seed; problem i has level levels[i % len(levels)] (balanced).

  Operands are 2..max_operand. Greedy SmolLM2-135M-Instruct solves few problems at the default 60 (about 1 in 20,
  level 1 included); max_operand=20 lifts its level-1 accuracy to about 1 in 4 (tests/data has the measured outputs).
  """
  levels = tuple(int(l) for l in levels)
  if not levels or any(l not in LEVELS for l in levels):
    raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
  if max_operand < 4:
    raise ValueError(f"max_operand must be >= 4, got {max_operand}")
  rng = random.Random(seed)
  problems: list[Problem] = []
  seen: set[str] = set()
  attempts = 0
  while len(problems) < count:
    attempts += 1
    if attempts > 1000 * (count + 10):
      raise ValueError(f"could not draw {count} unique problems at levels {levels}")
    try:
      problem = _draw(rng, levels[len(problems) % len(levels)], max_operand)
    except _Infeasible:
      continue
    if problem.question not in seen:
      seen.add(problem.question)
      problems.append(problem)
  return problems


def make_splits(num_train: int, num_eval: int, seed: int, levels: Sequence[int] = (1, 2, 3), *,
                max_operand: int = MAX_OPERAND) -> tuple[list[Problem], list[Problem]]:
  """Train and held-out problems with no question in both (one unique draw, split), deterministic per seed."""
  problems = make_problems(num_train + num_eval, seed, levels, max_operand=max_operand)
  return problems[:num_train], problems[num_train:]


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
  """The chat for a problem: the question alone as the user turn (the system prompt is the experiment's choice)."""
  return [{"role": "user", "content": problem.question}]


# ---------------------------------------------------------------------------------------------------------------
# Reading responses
# ---------------------------------------------------------------------------------------------------------------

# A number: optional "$", digits with optional thousands commas, optional decimals. The digits' span excludes "$".
_NUMBER = re.compile(r"(?<![\d.,])\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign


@dataclasses.dataclass(frozen=True)
class _Number:
  start: int  # span of the digits (no "$"; a sign is not part of it)
  end: int
  value: fractions.Fraction


def _numbers(text: str) -> list[_Number]:
  return [_Number(m.start(1), m.end(1), fractions.Fraction(m.group(1).replace(",", ""))) for m in
          _NUMBER.finditer(text)]


def _is_negative(text: str, number: _Number) -> bool:
  """A minus directly before the number is a sign (not a subtraction) unless an operand precedes it."""
  i = number.start - 1
  if i >= 0 and text[i] == "$":
    i -= 1
  if i < 0 or text[i] not in _MINUS:
    return False
  j = i - 1
  while j >= 0 and text[j] in " \t":
    j -= 1
  return j < 0 or not (text[j].isdigit() or text[j] == ")")


def _final_number(text: str) -> tuple[_Number, fractions.Fraction] | None:
  """The last number in the text and its signed value."""
  numbers = _numbers(text)
  if not numbers:
    return None
  last = numbers[-1]
  return last, -last.value if _is_negative(text, last) else last.value


def final_answer(text: str) -> int | None:
  """The final number stated in the response (the last one in the text); None if there is none or it is not an
  integer (a non-integer answer to these problems is never right, and must not round onto the answer)."""
  found = _final_number(text)
  if found is None or found[1].denominator != 1:
    return None
  return int(found[1])


def sequence_reward(text: str, answer: int) -> tuple[float, bool]:
  """(1.0 if the final answer is right else 0.0, whether a final answer could be read at all)."""
  got = final_answer(text)
  return (1.0 if got is not None and got == answer else 0.0), got is not None


@dataclasses.dataclass(frozen=True)
class Equation:
  """One explicit equation in a response: its span, the stated result's span, and whether the result is right."""
  start: int
  end: int
  result_start: int
  result_end: int
  stated: float
  value: float | None
  correct: bool


# Lexemes of arithmetic. Anything else (words, punctuation, newlines) ends a run of arithmetic.
_LEXEME = re.compile(
    r"(?P<space>[ \t]+|\*\*|\\[()\[\]]|\\,)"  # skipped: blanks, markdown bold, LaTeX \( \) \[ \] and thin space
    r"|(?P<num>\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)"
    r"|(?P<op>[+*/×÷·⋅\-\u2212]|\\times|\\cdot|\\div|(?<![A-Za-z])[xX](?![A-Za-z])"
    r"|\b(?:times|plus|minus|divided by|multiplied by)\b)"
    r"|(?P<lparen>\()|(?P<rparen>\))|(?P<eq>=)")
_OP_NAMES = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "x": "*", "X": "*", "×": "*", "·": "*", "⋅": "*",
             "\\times": "*", "\\cdot": "*", "/": "/", "÷": "/", "\\div": "/", "times": "*", "plus": "+",
             "minus": "-", "divided by": "/", "multiplied by": "*"}
# Units after a number or ")" when an operator or "=" follows: up to two words and a parenthesised note. SmolLM2
# writes "21 stickers - 12 stickers = 42 stickers", "14 minutes * 46 extra minutes = 640 minutes",
# "14 minutes (free time) + 12 minutes (baking) = 26 minutes" and "(12 + 17) minutes = 20 minutes".
_UNIT = re.compile(r"(?=[ \t]*[A-Za-z(])"
                   r"(?:[ \t]+(?!(?:x|X|times|plus|minus|divided|multiplied)\b)[A-Za-z]+){0,2}"
                   r"(?:[ \t]*\([A-Za-z][A-Za-z ]*\))?"
                   r"(?=[ \t]*(?:[-+*/×÷·⋅=)\u2212]|\\times|\\cdot|\\div|[xX](?![A-Za-z])"
                   r"|(?:times|plus|minus|divided by|multiplied by)\b))")


@dataclasses.dataclass(frozen=True)
class _Lex:
  kind: str  # "num", "op", "lparen", "rparen", "eq", "break"
  start: int
  end: int
  op: str = ""  # normalised operator
  value: fractions.Fraction | None = None


def _lex(text: str) -> list[_Lex]:
  out: list[_Lex] = []
  pos = 0
  while pos < len(text):
    m = _LEXEME.match(text, pos)
    if m is None or m.end() == pos:
      if not out or out[-1].kind != "break":
        out.append(_Lex("break", pos, pos + 1))
      pos += 1
      continue
    kind = m.lastgroup
    if kind == "num":
      digits = m.group().lstrip("$")
      start = m.end() - len(digits)
      prev = text[m.start() - 1] if m.start() > 0 else ""
      if prev and (prev.isdigit() or prev in ".,"):  # the tail of a malformed number ("1,2345"): not an operand
        out.append(_Lex("break", m.start(), m.end()))
      else:
        out.append(_Lex("num", start, m.end(), value=fractions.Fraction(digits.replace(",", ""))))
        unit = _UNIT.match(text, m.end())
        if unit and unit.end() > m.end():
          pos = unit.end()
          continue
    elif kind == "op":
      out.append(_Lex("op", m.start(), m.end(), op=_OP_NAMES[m.group()]))
    elif kind != "space":
      out.append(_Lex(kind, m.start(), m.end()))
      unit = _UNIT.match(text, m.end()) if kind == "rparen" else None
      if unit and unit.end() > m.end():
        pos = unit.end()
        continue
    pos = m.end()
  return out


class _Parser:
  """Recursive descent over lexemes with standard precedence: expr := term (+|- term)*, term := atom (*|/ atom)*,
  atom := number | ( expr ). Unary minus is not an operand here: "- 3 + 4" in prose is a bullet, not -3."""

  def __init__(self, lexemes: Sequence[_Lex]):
    self.lex, self.i = lexemes, 0

  def expr(self) -> fractions.Fraction | None:
    value = self.term()
    while self.i < len(self.lex) and self.lex[self.i].kind == "op" and self.lex[self.i].op in "+-":
      op = self.lex[self.i].op
      self.i += 1
      rhs = self.term()
      value = None if value is None or rhs is None else value + rhs if op == "+" else value - rhs
    return value

  def term(self) -> fractions.Fraction | None:
    value = self.atom()
    while self.i < len(self.lex) and self.lex[self.i].kind == "op" and self.lex[self.i].op in "*/":
      op = self.lex[self.i].op
      self.i += 1
      rhs = self.atom()
      if value is None or rhs is None or (op == "/" and rhs == 0):
        value = None
      else:
        value = value * rhs if op == "*" else value / rhs
    return value

  def atom(self) -> fractions.Fraction | None:
    if self.i >= len(self.lex):
      raise SyntaxError
    lex = self.lex[self.i]
    self.i += 1
    if lex.kind == "num":
      return lex.value
    if lex.kind == "lparen":
      value = self.expr()
      if self.i >= len(self.lex) or self.lex[self.i].kind != "rparen":
        raise SyntaxError
      self.i += 1
      return value
    raise SyntaxError


def _evaluate(lexemes: Sequence[_Lex]) -> tuple[bool, fractions.Fraction | None]:
  """(whether the lexemes are exactly one well-formed expression, its value or None for division by zero)."""
  if not lexemes:
    return False, None
  parser = _Parser(lexemes)
  try:
    value = parser.expr()
  except SyntaxError:
    return False, None
  return parser.i == len(lexemes), value


_MAX_SEGMENT = 40  # lexemes; a written equation side is far shorter


@dataclasses.dataclass(frozen=True)
class _Segment:
  lexemes: tuple[_Lex, ...]
  value: fractions.Fraction | None
  has_op: bool

  @property
  def plain(self) -> _Lex | None:
    """The number if this segment is a single (possibly negated) number, else None."""
    return self.lexemes[-1] if not self.has_op or self.negative else None

  @property
  def negative(self) -> bool:
    return len(self.lexemes) == 2 and self.lexemes[0].op == "-" and self.lexemes[1].kind == "num"


def _longest_valid(lexemes: Sequence[_Lex], suffix: bool) -> _Segment | None:
  """The longest well-formed suffix (the lhs: prose may precede it) or prefix (a rhs: prose may follow it), of at
  most _MAX_SEGMENT lexemes unless the whole is one (a long run of bare numbers must not cost cubic time)."""
  n = len(lexemes)
  for length in [n] + list(range(min(n - 1, _MAX_SEGMENT), 0, -1)):
    part = lexemes[n - length:] if suffix else lexemes[:length]
    ok, value = _evaluate(part)
    if ok:
      return _Segment(tuple(part), value, any(l.kind == "op" for l in part))
  return None


def equations(text: str) -> list[Equation]:
  """Every explicit equation: a run of arithmetic split at "=" into segments; each segment after the first that is
  a plain number is the stated result of the nearest earlier segment that has an operator ("2 + 3 = 5",
  "2 + 3 x 4 = 14", "a + b = c + d = e" checks e against c + d, "29 + 14 = 43 = 43" checks both)."""
  lexemes = _lex(text)
  out: list[Equation] = []
  run: list[_Lex] = []
  for lex in lexemes + [_Lex("break", len(text), len(text))]:
    if lex.kind != "break":
      run.append(lex)
      continue
    segments: list[list[_Lex]] = [[]]
    for item in run:
      if item.kind == "eq":
        segments.append([])
      else:
        segments[-1].append(item)
    run = []
    lhs: _Segment | None = None
    for i, raw in enumerate(segments):
      if i > 0 and len(raw) >= 2 and raw[0].op == "-" and raw[1].kind == "num" and (len(raw) == 2 or (
          raw[2].kind == "op" and raw[2].op in "+-")):  # a negative result: "7 - 9 = -2"
        segment = _Segment((raw[0], raw[1]), -raw[1].value, True)
      else:
        segment = _longest_valid(raw, suffix=(i == 0))
      if segment is None:
        lhs = None
        continue
      if i > 0 and segment.plain is not None and lhs is not None:
        number = segment.plain
        stated = -number.value if segment.negative else number.value
        value = None if lhs.value is None else float(lhs.value)
        correct = lhs.value is not None and abs(float(stated - lhs.value)) < 1e-6
        out.append(Equation(start=lhs.lexemes[0].start, end=number.end, result_start=number.start,
                            result_end=number.end, stated=float(stated), value=value, correct=correct))
      if segment.has_op and not segment.negative:
        lhs = segment
      if len(segment.lexemes) < len(raw) and i > 0:
        lhs = None  # prose follows this rhs: the chain ends here
  return out


def char_labels(text: str, answer: int, finished: bool = True) -> np.ndarray:
  """int8 [len(text)]: +1 on the result of each correct equation and on a right final answer, -1 on the result of
  each wrong equation and on a wrong final answer, 0 elsewhere (a non-integer final number is not labelled, as
  final_answer reads none). Errors win where spans overlap: a right final answer stated by a wrong equation is -1.

  `finished=False` (the response hit its token budget before its end-of-turn): it has no final answer, so its last
  number (often an intermediate one, or copied from the question) is not labelled as one; an equation result that
  runs up to the cut may itself be cut ("= 2" of "= 27"), so it is not labelled either. Its other equations are."""
  labels = np.zeros(len(text), np.int8)
  spans: list[tuple[int, int, int]] = [(e.result_start, e.result_end, 1 if e.correct else -1) for e in equations(text)
                                       if finished or e.result_end < len(text)]
  found = _final_number(text) if finished else None
  if found is not None and found[1].denominator == 1:
    number, value = found
    spans.append((number.start, number.end, 1 if value == answer else -1))
  for start, end, label in sorted(spans, key=lambda s: -s[2]):  # +1 spans first, so that -1 overwrites them
    labels[start:end] = label
  return labels


def token_labels(offsets: Sequence[tuple[int, int]], labels: np.ndarray) -> np.ndarray:
  """int8 [num_tokens]: -1 if any character a token covers is -1, else +1 if any is +1, else 0."""
  out = np.zeros(len(offsets), np.int8)
  for t, (start, end) in enumerate(offsets):
    chars = labels[start:end]
    if (chars < 0).any():
      out[t] = -1
    elif (chars > 0).any():
      out[t] = 1
  return out


def token_truth(tokenizer: Any, ids: Sequence[int], answer: int, finished: bool = True) -> np.ndarray:
  """int8 labels for exactly these response token ids (trailing special tokens such as <|im_end|> get 0);
  `finished`: whether the model ended the response itself (see char_labels).

  The text is the decoding of the ids; character offsets come from re-encoding that text with the same tokenizer,
  which must give back exactly the same ids (a model can emit a non-canonical tokenization; then there is no honest
  alignment, and we raise instead of guessing by string matching).
  """
  ids = [int(i) for i in ids]
  special = set(int(i) for i in tokenizer.all_special_ids)
  body = len(ids)
  while body > 0 and ids[body - 1] in special:
    body -= 1
  text = tokenizer.decode(ids[:body], skip_special_tokens=False, clean_up_tokenization_spaces=False)
  encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  got = list(encoded["input_ids"])
  if got != ids[:body]:
    first = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), body))
    raise ValueError(f"re-encoding the decoded response does not give back its ids: they first differ at position "
                     f"{first} (re-encoded {got[first:first + 3]}, given {ids[first:first + 3]})")
  labels = token_labels([tuple(o) for o in encoded["offset_mapping"]], char_labels(text, answer, finished))
  return np.concatenate([labels, np.zeros(len(ids) - body, np.int8)])


def token_rewards(tokenizer: Any, ids: Sequence[int], answer: int) -> np.ndarray:
  """float32 token rewards on the T-REG scale: +0.5 on correct, -0.5 on erroneous, 0 on unlabelled tokens."""
  return 0.5 * token_truth(tokenizer, ids, answer).astype(np.float32)


def equation_error_rate(texts: Sequence[str]) -> tuple[int, int]:
  """(wrong equations, all equations) over the texts: how often the model's own arithmetic is wrong."""
  wrong = total = 0
  for text in texts:
    for eq in equations(text):
      total += 1
      wrong += not eq.correct
  return wrong, total
