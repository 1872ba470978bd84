"""tregjax.tasks.arith: problem generation, answer parsing, the equation oracle and token-level truth.

Goldens are hand-labelled: the strings below and tests/data/smollm2_arith_responses.json (greedy SmolLM2-135M-Instruct
responses whose equations, final answers and rewards were checked by reading them). Regenerate the responses with
`PYTHONPATH=. python tests/arith_task_test.py`, then label them again by hand: the script leaves `expected` empty.
"""

from __future__ import annotations

import ast
import fractions
import json
import os
import re

import numpy as np
import pytest

from tregjax.tasks import arith

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smollm2_arith_responses.json")


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------


def _nodes(expression: str) -> tuple[fractions.Fraction, list[tuple[str, fractions.Fraction, fractions.Fraction,
                                                                        fractions.Fraction]], list[int]]:
  """Independent evaluation of a ground-truth expression with Python's own parser: (value, every binary operation as
  (op, left, right, result), every literal)."""
  ops: list = []
  literals: list[int] = []

  def ev(node):
    if isinstance(node, ast.Constant):
      literals.append(node.value)
      return fractions.Fraction(node.value)
    assert isinstance(node, ast.BinOp), ast.dump(node)
    left, right = ev(node.left), ev(node.right)
    op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
    result = {"+": left + right, "-": left - right, "*": left * right, "/": left / right}[op]
    ops.append((op, left, right, result))
    return result

  return ev(ast.parse(expression, mode="eval").body), ops, literals


def _last_step_numbers(node: ast.expr) -> set[int]:
  """The numbers of the step before a division: the start amount, both factors of a starting product, or the
  right operand (a number or a group "c * d") of a later step."""
  if isinstance(node, ast.Constant):
    return {node.value}
  if isinstance(node.op, ast.Mult) and isinstance(node.left, ast.Constant):
    return {node.left.value, node.right.value}
  return {c.value for c in ast.walk(node.right) if isinstance(c, ast.Constant)}


def test_make_problems_is_deterministic_and_seeded():
  a, b = arith.make_problems(40, seed=3), arith.make_problems(40, seed=3)
  assert a == b
  assert [p.question for p in arith.make_problems(40, seed=4)] != [p.question for p in a]
  assert arith.make_problems(15, seed=3) == a[:15]  # a prefix: more problems do not reshuffle the first ones


def test_make_problems_answers_levels_and_ranges():
  problems = arith.make_problems(300, seed=0)
  assert len({p.question for p in problems}) == 300
  assert [p.level for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
  for p in problems:
    value, ops, literals = _nodes(p.expression)
    assert value == p.answer and isinstance(p.answer, int), p
    assert len(ops) == p.level, p
    for op, left, right, result in ops:
      assert result.denominator == 1 and result >= 1, (p, op, left, right)  # exact division, never negative or 0
      if op == "/":
        assert result >= 2, p
      if op == "*":
        assert result < 1000, p
    assert all(2 <= n <= 60 for n in literals), p
    # every operand is stated in the question, in order
    stated = [int(n) for n in re.findall(r"\d+", p.question)]
    assert stated == literals, p
    assert p.question.endswith("?")
    for node in ast.walk(ast.parse(p.expression, mode="eval")):
      if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        assert node.right.value not in _last_step_numbers(node.left), p  # not "(3 * 37) / 3", which only undoes it
  ops_used = {op for p in problems for op, *_ in _nodes(p.expression)[1]}
  assert ops_used == {"+", "-", "*", "/"}
  text = " ".join(p.question for p in problems)
  for word in ("dollars", "minutes", "boxes", "bags", "coins", "marbles", "apples", "stickers"):
    assert word in text, word
  assert len({p.question.split()[0] for p in problems}) >= 10  # names vary


def test_make_problems_levels_subset():
  problems = arith.make_problems(30, seed=1, levels=(2,))
  assert {p.level for p in problems} == {2}
  assert all(len(_nodes(p.expression)[1]) == 2 for p in problems)
  assert [p.level for p in arith.make_problems(4, seed=1, levels=(3, 1))] == [3, 1, 3, 1]
  with pytest.raises(ValueError):
    arith.make_problems(3, seed=1, levels=(5,))


def test_max_operand():
  problems = arith.make_problems(60, seed=2, max_operand=20)
  literals = [n for p in problems for n in _nodes(p.expression)[2]]
  assert max(literals) == 20 and min(literals) == 2
  train, held_out = arith.make_splits(10, 5, seed=2, max_operand=20)
  assert train + held_out == problems[:15]


def test_make_splits_disjoint_and_deterministic():
  train, held_out = arith.make_splits(200, 50, seed=5)
  assert (len(train), len(held_out)) == (200, 50)
  assert not {p.question for p in train} & {p.question for p in held_out}
  assert arith.make_splits(200, 50, seed=5) == (train, held_out)
  assert {p.level for p in held_out} == {1, 2, 3}


def test_prompt_messages():
  p = arith.Problem(question="Tom has 29 coins and buys 14 more. How many coins does Tom have now?", answer=43,
                    level=1, expression="29 + 14")
  assert arith.prompt_messages(p) == [{"role": "user", "content": p.question}]
  assert "equation" in arith.SYSTEM_CAREFUL and "The answer is N." in arith.SYSTEM_CAREFUL
  assert "careless" in arith.SYSTEM_CARELESS


# ---------------------------------------------------------------------------------------------------------------
# Final answers
# ---------------------------------------------------------------------------------------------------------------

FINAL_ANSWERS = [
    ("The answer is 42.", 42),
    ("The answer is: 42", 42),
    ("#### 1,200", 1200),
    ("It costs $1,200 in total.", 1200),
    ("So she has 42.0 apples", 42),
    ("Each part is 3.5 minutes long.", None),
    ("I cannot solve this.", None),
    ("", None),
    ("First 3 + 4 = 7, then 7 * 2 = 14 coins.", 14),
    ("There are 1, 2, 3 apples", 3),
    ("Tom now has -5 coins.", -5),
    ("She pays $18.", 18),
]


@pytest.mark.parametrize("text,expected", FINAL_ANSWERS)
def test_final_answer(text, expected):
  assert arith.final_answer(text) == expected


def test_sequence_reward():
  assert arith.sequence_reward("The answer is 42.", 42) == (1.0, True)
  assert arith.sequence_reward("The answer is 41.", 42) == (0.0, True)
  assert arith.sequence_reward("no idea", 42) == (0.0, False)
  assert arith.sequence_reward("Each gets 3.5", 3) == (0.0, False)
  assert arith.sequence_reward("#### $1,200", 1200) == (1.0, True)
  assert arith.sequence_reward("12 x 11 = 132, so 132 - 11 = 121.", 132) == (0.0, True)  # the *final* number


# ---------------------------------------------------------------------------------------------------------------
# Equations and character labels (hand-written spans)
# ---------------------------------------------------------------------------------------------------------------


def _span(text: str, sub: str, nth: int = 0) -> tuple[int, int]:
  start = -1
  for _ in range(nth + 1):
    start = text.index(sub, start + 1)
  return start, start + len(sub)


# (response, answer, [(equation as written, its result, nth occurrence of the result string, correct)],
#  the final answer's (string, nth occurrence, label: whether it equals the answer) or None)
EQUATION_CASES = [
    ("29 + 14 = 31", 43, [("29 + 14 = 31", "31", 0, False)], ("31", 0, -1)),
    ("2 + 3 x 4 = 14, so the answer is 14.", 14, [("2 + 3 x 4 = 14", "14", 0, True)], ("14", 1, 1)),
    ("2 + 3 x 4 = 20", 20, [("2 + 3 x 4 = 20", "20", 0, False)], ("20", 0, 1)),
    ("(5 * 13) - 7 = 58. The answer is 58.", 58, [("(5 * 13) - 7 = 58", "58", 0, True)], ("58", 1, 1)),
    ("12 × 3 = 36 and 36 ÷ 4 = 8. The answer is 8.", 9,
     [("12 × 3 = 36", "36", 0, True), ("36 ÷ 4 = 8", "8", 0, False)], ("8", 1, -1)),
    ("First 6 * 7 = 42 = 42, then 42 + 8 = 50 + 2 = 52.", 52,
     [("6 * 7 = 42", "42", 0, True), ("6 * 7 = 42 = 42", "42", 1, True), ("50 + 2 = 52", "52", 0, True)], ("52", 0, 1)),
    ("3 + 4 = 8 - 1 = 6", 7, [("8 - 1 = 6", "6", 0, False)], ("6", 0, -1)),
    ("She pays 4 x $12 = $48 for the tickets, and $1,200 / 4 = $300 is the rent.", 300,
     [("4 x $12 = $48", "48", 0, True), ("1,200 / 4 = $300", "300", 0, True)], ("300", 0, 1)),
    ("2.5 * 4 = 10.0 and 7 / 2 = 3.5", 3, [("2.5 * 4 = 10.0", "10.0", 0, True), ("7 / 2 = 3.5", "3.5", 0, True)], None),
    ("8 / 0 = 0", 0, [("8 / 0 = 0", "0", 1, False)], ("0", 1, 1)),
    ("The answer is 7.", 7, [], ("7", 0, 1)),
    ("I do not know.", 7, [], None),
    ("Lucas has 21 stickers - 12 stickers = 42 stickers left.", 9,
     [("21 stickers - 12 stickers = 42", "42", 0, False)], ("42", 0, -1)),
    ("- 29 + 14 = **43**\n- 43 - 5 = 38\n#### 38", 38,
     [("29 + 14 = **43", "43", 0, True), ("43 - 5 = 38", "38", 0, True)], ("38", 1, 1)),
    ("5 - 8 = -3", 3, [("5 - 8 = -3", "3", 0, True)], ("3", 0, -1)),  # the final answer is -3
    ("The total = $ and 3 + 4 = 7. Also 2 + 3 = 5 + 1, and Tom has 5 apples = 5 apples.", 5,
     [("3 + 4 = 7", "7", 0, True)], ("5", 2, 1)),
    ("(2 + 3) * 4 = 20 but 2 + 3 * 4 = 20", 14,
     [("(2 + 3) * 4 = 20", "20", 0, True), ("2 + 3 * 4 = 20", "20", 1, False)], ("20", 1, -1)),
    ("\\(7 \\times 6 = 42\\) and 5 times 3 = 16", 16,
     [("7 \\times 6 = 42", "42", 0, True), ("5 times 3 = 16", "16", 0, False)], ("16", 0, 1)),
]


@pytest.mark.parametrize("text,answer,expected,final", EQUATION_CASES)
def test_equations_and_char_labels(text, answer, expected, final):
  got = arith.equations(text)
  want = []
  for eq_text, result, nth, correct in expected:
    rs, re_ = _span(text, result, nth)
    want.append((re_ - len(eq_text), re_, rs, re_, correct))
    assert text[re_ - len(eq_text):re_] == eq_text  # the golden itself is consistent
  assert [(e.start, e.end, e.result_start, e.result_end, e.correct) for e in got] == want
  labels = np.zeros(len(text), np.int8)
  spans = [(_span(text, r, n), 1 if c else -1) for _, r, n, c in expected]
  if final is not None:
    spans.append((_span(text, final[0], final[1]), final[2]))
  for (s, e), label in spans:
    if label > 0:
      labels[s:e] = 1
  for (s, e), label in spans:
    if label < 0:
      labels[s:e] = -1
  np.testing.assert_array_equal(arith.char_labels(text, answer), labels)


def test_equation_values():
  eqs = arith.equations("2 + 3 x 4 = 20 and 5 - 8 = -3 and 8 / 0 = 0 and 2.5 * 4 = 10.0")
  assert [(e.stated, e.value) for e in eqs] == [(20.0, 14.0), (-3.0, -3.0), (0.0, None), (10.0, 10.0)]
  assert arith.equation_error_rate(["29 + 14 = 31", "no maths", "2 * 3 = 6 and 6 + 1 = 8"]) == (2, 3)


def test_token_labels():
  char = np.array([0, 0, 1, 1, -1, 0, 1], np.int8)
  offsets = [(0, 2), (1, 3), (3, 5), (5, 6), (6, 7), (0, 0)]
  np.testing.assert_array_equal(arith.token_labels(offsets, char), [0, 1, -1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------------------------
# Token-level truth on the real SmolLM2 tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from tregjax import assets  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(assets.tokenizer_dir("smollm2"))


def _labelled(tok, ids, labels):
  return [(tok.decode([i]), int(l)) for i, l in zip(ids, labels) if l != 0]


def test_token_truth_hand_made(tok):
  text = "29 + 14 = 31. The answer is 31."
  ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  labels = arith.token_truth(tok, ids, 43)
  assert labels.dtype == np.int8 and labels.shape == (len(ids),) and labels[-1] == 0
  assert _labelled(tok, ids, labels) == [("3", -1), ("1", -1), ("3", -1), ("1", -1)]

  text = "Tom has 29 + 14 = 43 coins, then 43 - 12 = 32. So he has 31."
  ids = tok(text, add_special_tokens=False)["input_ids"]
  labels = arith.token_truth(tok, ids, 31)
  assert _labelled(tok, ids, labels) == [("4", 1), ("3", 1), ("3", -1), ("2", -1), ("3", 1), ("1", 1)]
  rewards = arith.token_rewards(tok, ids, 31)
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards, 0.5 * labels)


def test_token_truth_rejects_non_canonical_ids(tok):
  text = "29 + 14 = 31"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  eq = ids.index(tok.convert_tokens_to_ids("Ġ="))
  split = ids[:eq] + tok(" ", add_special_tokens=False)["input_ids"] + tok("=", add_special_tokens=False)["input_ids"] \
      + ids[eq + 1:]
  assert tok.decode(split) == text  # the same text, spelled with other tokens
  with pytest.raises(ValueError, match=f"position {eq}"):
    arith.token_truth(tok, split, 43)


# ---------------------------------------------------------------------------------------------------------------
# Real SmolLM2 responses, hand-labelled
# ---------------------------------------------------------------------------------------------------------------


def _rows():
  with open(DATA) as f:
    return json.load(f)["responses"]


def test_smollm2_responses_against_hand_labels():
  rows = _rows()
  assert len(rows) >= 12
  for row in rows:
    text, want = row["response"], row["expected"]
    got = [(text[e.start:e.end], text[e.result_start:e.result_end], e.correct) for e in arith.equations(text)]
    assert got == [(e["text"], e["result"], e["correct"]) for e in want["equations"]], row["question"]
    assert arith.final_answer(text) == want["final_answer"], row["question"]
    assert arith.sequence_reward(text, row["answer"]) == (want["sequence_reward"], want["final_answer"] is not None)


def test_smollm2_token_truth_on_generated_ids(tok):
  for row in _rows():
    ids, text, want = row["ids"], row["response"], row["expected"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    if "token_truth_error_position" in want:
      # The model spelled its text with other tokens than the tokenizer would (e.g. "\n", "\n" for "\n\n" at the
      # cut-off): no honest alignment exists, token_truth must refuse.
      with pytest.raises(ValueError, match=f"position {want['token_truth_error_position']} "):
        arith.token_truth(tok, ids, row["answer"])
      continue
    labels = arith.token_truth(tok, ids, row["answer"])
    assert labels.shape == (len(ids),)
    # Expected character labels from the hand labels: each equation's result, then the final answer's number.
    char = np.zeros(len(text), np.int8)
    spans, pos = [], 0
    for e in want["equations"]:
      start = text.index(e["text"], pos)
      end = start + len(e["text"])
      spans.append((end - len(e["result"]), end, 1 if e["correct"] else -1))
      pos = start + 1
    if want["final_answer"] is not None:
      end = text.rindex(str(abs(want["final_answer"]))) + len(str(abs(want["final_answer"])))
      spans.append((end - len(str(abs(want["final_answer"]))), end, 1 if want["final_answer"] == row["answer"] else -1))
    for s, e, label in sorted(spans, key=lambda x: -x[2]):
      char[s:e] = label
    pieces = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected_tokens = [(text[s:e], int(-1 if (char[s:e] < 0).any() else 1 if (char[s:e] > 0).any() else 0))
                       for s, e in pieces]
    got_tokens = [(tok.decode([i]), int(l)) for i, l in zip(ids, labels)][:len(pieces)]
    assert got_tokens == expected_tokens, row["question"]
    assert (labels[len(pieces):] == 0).all()
    # Every labelled token is a piece of a labelled number (SmolLM2 spells numbers one digit per token).
    assert all(re.fullmatch(r" ?[\d.]", t) for t, l in got_tokens if l != 0), row["question"]
    assert (labels != 0).sum() == (char != 0).sum()  # one token per labelled character


# ---------------------------------------------------------------------------------------------------------------
# Regenerating the responses (not part of the test run)
# ---------------------------------------------------------------------------------------------------------------

SEED, NUM_PROBLEMS, NUM_CAREFUL, SMALL_SEED, NUM_SMALL, MAX_NEW_TOKENS = 2024, 12, 4, 11, 8, 128


def generate_responses(path: str = DATA) -> None:
  """Greedy SmolLM2-135M-Instruct responses, in one batched generate call, to make_problems(12, seed=2024) (user turn
  only), to the first 4 of them with SYSTEM_CAREFUL as the system turn, and to 8 level-1 problems with operands <= 20
  (which it sometimes solves). The expected fields are left empty for hand labelling."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from tregjax import assets, models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top

  gguf = assets.fetch("smollm2")
  model = models.from_pretrained(str(gguf), dtype=jnp.float32)
  tokenizer = AutoTokenizer.from_pretrained(gguf.parent / "tokenizer")
  problems = arith.make_problems(NUM_PROBLEMS, seed=SEED)
  chats = [(None, p, arith.prompt_messages(p)) for p in problems]
  chats += [("careful", p, [{"role": "system", "content": arith.SYSTEM_CAREFUL}] + arith.prompt_messages(p))
            for p in problems[:NUM_CAREFUL]]
  chats += [(None, p, arith.prompt_messages(p))
            for p in arith.make_problems(NUM_SMALL, seed=SMALL_SEED, levels=(1,), max_operand=20)]
  prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"])
             for _, _, c in chats]
  out = decoding.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, key=jax.random.key(0),
                          eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
  rows = []
  for i, (system, p, _) in enumerate(chats):
    ids = [int(t) for t in out.tokens[i, :int(out.lengths[i])]]
    rows.append(dict(system=system, question=p.question, answer=p.answer, level=p.level, expression=p.expression,
                     response=tokenizer.decode(ids, skip_special_tokens=True), ids=ids,
                     expected=dict(equations=[], final_answer=None, sequence_reward=None)))
  meta = dict(model="SmolLM2-135M-Instruct.Q4_1.gguf (tregjax.assets smollm2), float32, greedy",
              problems=f"arith.make_problems({NUM_PROBLEMS}, seed={SEED}); then its first {NUM_CAREFUL} with "
                       f"SYSTEM_CAREFUL (system 'careful'); then arith.make_problems({NUM_SMALL}, seed={SMALL_SEED}, "
                       f"levels=(1,), max_operand=20)", max_new_tokens=MAX_NEW_TOKENS,
              labels="expected: hand-labelled by reading each response (equation as written up to its result, "
                     "the result, whether it is arithmetically right; the last number; its reward)")
  write_json(dict(meta=meta, responses=rows), path)


def write_json(data, path: str) -> None:
  """Indented JSON with each list of token ids on one line (readable diffs of the hand labels)."""
  text = json.dumps(data, indent=1, ensure_ascii=False)
  text = re.sub(r"\[\s+(-?\d+(?:,\s+-?\d+)*)\s+\]", lambda m: "[" + ", ".join(re.findall(r"-?\d+", m.group(1))) + "]",
                text)
  with open(path, "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  generate_responses()
