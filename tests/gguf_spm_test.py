"""SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model == "llama"`) built torch-free.

The vocabulary is learned here from a small embedded corpus (BPE merges in order, SentencePiece layout: specials,
the 256 <0xXX> byte pieces, merged pieces scored by merge order, then single characters) and written as a GGUF the
way llama.cpp's converter writes one. Two goldens: transformers' own GGUF tokenizer (torch side), and a plain loop
of llama.cpp's SentencePiece tokenizer (llama-vocab.cpp: split out control/user-defined tokens, prefix a space to
each text stretch, repeatedly join the adjacent pair whose concatenation is the best-scored piece, byte fallback).
"""

import json

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tregjax.models import gguf as tj_gguf

transformers = pytest.importorskip("transformers")

CORPUS = """The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces; the pieces are
words, parts of words and single characters. Sentence piece models treat the space as a normal symbol, written as a
lower one eighth block, so that decoding is lossless. Byte fallback turns any character outside the vocabulary into
its UTF-8 bytes. Learning to merge the most frequent pairs of symbols gives the byte pair encoding vocabulary.
Reward models score whole answers; token level rewards say which tokens helped. Preference optimisation trains the
policy to prefer the chosen answer over the rejected one, regularised by the reference model. x = 3.14, y = 42!
"""
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
METASPACE = "\u2581"
LLAMA_HEAD = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<|im_start|>", CONTROL),
              ("<|im_end|>", CONTROL), ("<tool>", USER_DEFINED), ("<unused0>", UNUSED)]
# Gemma's layout: pad/eos/bos/unk first, turn markers, and whitespace runs stored with real spaces (user-defined).
GEMMA_HEAD = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
              ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("<unused0>", UNUSED)] + [
                  (" " * n, USER_DEFINED) for n in range(2, 9)]
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                  "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHAT = [{"role": "user", "content": "Which answer is chosen?"}, {"role": "assistant", "content": "The first one."},
        {"role": "user", "content": "  Why?  "}]

# Plain text: unicode outside the vocabulary (byte fallback), multiple spaces, newlines, tabs, digits.
PLAIN = [
    "Hello world",
    "The reward model scores the chosen answer over the rejected one.",
    "two  spaces,   three and\nnew lines\n\n\nend",
    "東京 🙂 naïve café — Ωmega",
    "tabs\tand\u00a0nbsp, x=3.14159; y = 1e-5!",
    "tokenizers",
    "",
]
LEADING = [" leading space", "   three leading spaces", " ", "\n starts with a newline"]
WITH_TOKENS = ["<|im_start|>user\nhi there<|im_end|>\n", "use <tool> now<tool>again</s>", "<s>The pieces",
               "<start_of_turn>user\n  two spaces<end_of_turn>\n", "<unk> and <unused0>"]


def spm_vocab(head):
  """(tokens, scores, types) of a SentencePiece BPE vocabulary learned from CORPUS."""
  trainer_tok = Tokenizer(models.BPE())
  trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
  trainer_tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=420, show_progress=False))
  learned = json.loads(trainer_tok.to_str())["model"]
  pieces = []
  for merge in learned["merges"]:
    left, right = merge if isinstance(merge, list) else merge.split(" ")
    if left + right not in pieces:
      pieces.append(left + right)
  chars = sorted(t for t in learned["vocab"] if len(t) == 1)
  tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
  types = [ty for _, ty in head] + [BYTE] * 256 + [NORMAL] * (len(pieces) + len(chars))
  scores = [0.0] * (len(head) + 256) + [-float(i) for i in range(len(pieces) + len(chars))]
  assert len(set(tokens)) == len(tokens) and len(pieces) > 250
  return tokens, scores, types


def write_spm_gguf(path, style, arch=None):
  """A tokenizer-only GGUF as llama.cpp's converter writes it (`_set_vocab_sentencepiece`)."""
  tokens, scores, types = spm_vocab(LLAMA_HEAD if style == "llama" else GEMMA_HEAD)
  writer = GGUFWriter(str(path), arch or ("llama" if style == "llama" else "gemma2"))
  writer.add_block_count(1)
  writer.add_context_length(128)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(1)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_rope_dimension_count(8)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  if style == "llama":
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(LLAMA_TEMPLATE)
  else:
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)  # Gemma*Model.set_vocab
    writer.add_chat_template(GEMMA_TEMPLATE)
  writer.add_add_bos_token(True)
  writer.add_add_eos_token(False)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return tokens, scores, types


def llama_cpp_spm(text, tokens, scores, types, *, add_space_prefix, bos_id=None):
  """llama.cpp's SPM tokenizer (llama-vocab.cpp, llm_tokenizer_spm) as a plain loop."""
  ids = {t: i for i, t in enumerate(tokens)}
  whole = sorted((t for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)), key=len, reverse=True)
  fragments = [text] if text else []  # tokenizer_st_partition: longest special tokens first
  for special in whole:
    split = []
    for frag in fragments:
      if isinstance(frag, int):
        split.append(frag)
        continue
      parts = frag.split(special)
      for k, part in enumerate(parts):
        if k:
          split.append(ids[special])
        if part:
          split.append(part)
    fragments = split
  out = [] if bos_id is None else [bos_id]
  prev_special = True
  for frag in fragments:
    if isinstance(frag, int):
      out.append(frag)
      prev_special = True
      continue
    symbols = list(((" " if add_space_prefix and prev_special else "") + frag).replace(" ", METASPACE))
    prev_special = False
    while True:
      best = None
      for k in range(len(symbols) - 1):
        joined = symbols[k] + symbols[k + 1]
        if joined in ids and (best is None or scores[ids[joined]] > scores[ids[symbols[best] + symbols[best + 1]]]):
          best = k
      if best is None:
        break
      symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    for sym in symbols:
      out.extend([ids[sym]] if sym in ids else [ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")])
  return out


@pytest.fixture(scope="module", params=["llama", "gemma"])
def spm(request, tmp_path_factory):
  """(style, vocabulary, our tokenizer, transformers' GGUF tokenizer, gguf path) per style."""
  style = request.param
  path = tmp_path_factory.mktemp(style) / f"{style}.gguf"
  vocab = write_spm_gguf(path, style)
  ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  return style, vocab, tj_gguf.tokenizer_from_gguf(path), ref, path


def test_ids_equal_transformers_gguf_tokenizer_and_llama_cpp(spm):
  style, (tokens, scores, types), ours, ref, _ = spm
  prefix = style == "llama"
  bos = 1 if prefix else 2
  # Where transformers' prefix rule and llama.cpp's agree (see LEADING/WITH_TOKENS below), all three agree.
  same_as_transformers = PLAIN + ([] if prefix else LEADING + WITH_TOKENS)
  for text in same_as_transformers:
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert ids == llama_cpp_spm(text, tokens, scores, types, add_space_prefix=prefix, bos_id=bos), text
  for text in LEADING + WITH_TOKENS:
    # llama.cpp prefixes "\u2581" to text that starts with a space and to text right after a control or
    # user-defined token; transformers' Metaspace(prepend_scheme="first") does neither. We follow llama.cpp.
    assert ours(text)["input_ids"] == llama_cpp_spm(text, tokens, scores, types, add_space_prefix=prefix,
                                                    bos_id=bos), text
  # The tests exercise what they claim: byte fallback, merged whitespace, control and user-defined tokens whole.
  cafe = ours.convert_ids_to_tokens(ours(PLAIN[3], add_special_tokens=False)["input_ids"])
  assert "<0xE6>" in cafe and "<0x9F>" in cafe
  if prefix:
    assert {"<|im_start|>", "<|im_end|>"} <= set(ours.convert_ids_to_tokens(ours(WITH_TOKENS[0])["input_ids"]))
    assert "<tool>" in ours.convert_ids_to_tokens(ours(WITH_TOKENS[1])["input_ids"])
  else:  # Gemma's whitespace runs, stored with real spaces, come out as their own (respelled) pieces
    pieces = ours.convert_ids_to_tokens(ours(WITH_TOKENS[3])["input_ids"])
    assert pieces[:3] == ["<bos>", "<start_of_turn>", "u"] and METASPACE * 2 in pieces
    assert ours(PLAIN[2])["input_ids"].count(tokens.index("   ")) == 1
  first = ours.convert_ids_to_tokens(ours("The pieces", add_special_tokens=False)["input_ids"])[0]
  assert first == (METASPACE + "The" if prefix else "The")


def test_decode_encode_round_trips(spm):
  _, _, ours, ref, _ = spm
  for text in PLAIN + LEADING:
    assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text, text
    assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text, text
  for text in PLAIN:
    ids = ref(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
  for text in WITH_TOKENS:  # specials kept in the text decode to themselves
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids).replace(" ", "") == text.replace(" ", ""), text


def test_special_tokens_and_flags_match_transformers(spm):
  style, (tokens, _, _), ours, ref, _ = spm
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
               "pad_token_id"):
    assert getattr(ours, attr) == getattr(ref, attr), attr
  assert ours("x")["input_ids"][0] == ours.bos_token_id and ours("x")["input_ids"][-1] != ours.eos_token_id
  # Same vocabulary; transformers' GemmaTokenizer appends a "<mask>" token the file does not have.
  assert ours.get_vocab() == {t: i for t, i in ref.get_vocab().items() if t != "<mask>"}
  assert len(ours) == len(tokens) == len(ref) - (style == "gemma")
  # Control tokens are special (dropped by skip_special_tokens); the user-defined one is not.
  text = "<|im_start|>hi<tool><|im_end|>" if style == "llama" else "<start_of_turn>hi<end_of_turn>"
  assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == ("hi<tool>" if style == "llama" else "hi")
  # The merges derived from the scores (Llama) or the file order (Gemma) are transformers' own.
  merges = json.loads(ours.backend_tokenizer.to_str())["model"]["merges"]
  assert merges == json.loads(ref.backend_tokenizer.to_str())["model"]["merges"] and len(merges) > 250


def test_chat_template_renders_and_tokenizes_identically(spm):
  style, _, ours, ref, _ = spm
  text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  assert text == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  assert text.startswith("<s>[INST] Which" if style == "llama" else "<bos><start_of_turn>user\nWhich")
  if style == "gemma":  # (Llama: the text after "<s>" gets llama.cpp's prefix, see the ids test)
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]


def test_saved_tokenizer_directory_reloads_in_transformers(spm, tmp_path):
  _, _, ours, _, path = spm
  saved = transformers.AutoTokenizer.from_pretrained(tj_gguf.save_tokenizer_from_gguf(path, tmp_path / "tok"))
  for text in PLAIN + LEADING + WITH_TOKENS:
    assert saved(text)["input_ids"] == ours(text)["input_ids"], text
    ids = ours(text)["input_ids"]
    assert saved.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True), text
  assert saved.apply_chat_template(CHAT, tokenize=False) == ours.apply_chat_template(CHAT, tokenize=False)
  assert saved.eos_token_id == ours.eos_token_id and saved.pad_token_id == ours.pad_token_id


def test_gemma1_architecture_builds_the_gemma_tokenizer(tmp_path):
  # transformers refuses "gemma" GGUFs, so the golden is the same vocabulary written as gemma2, which it reads.
  write_spm_gguf(tmp_path / "g1.gguf", "gemma", arch="gemma")
  write_spm_gguf(tmp_path / "g2.gguf", "gemma", arch="gemma2")
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="g2.gguf")
  ours = tj_gguf.tokenizer_from_gguf(tmp_path / "g1.gguf")
  for text in PLAIN + LEADING + WITH_TOKENS:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text


@pytest.mark.parametrize("kind", ["bert", "t5", None])
def test_unsupported_tokenizer_model_names_file_and_field(kind, tmp_path):
  path = tmp_path / "other.gguf"
  writer = GGUFWriter(str(path), "llama")
  if kind is not None:
    writer.add_tokenizer_model(kind)
  writer.add_token_list(["<unk>", "a", "b"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  expected = (rf"other\.gguf: tokenizer\.ggml\.model='{kind}' is not supported" if kind else
              r"other\.gguf: metadata field 'tokenizer\.ggml\.model' is missing")
  with pytest.raises(tj_gguf.GGUFError, match=expected):
    tj_gguf.tokenizer_from_gguf(path)


def test_sentencepiece_vocabulary_without_scores_is_refused(tmp_path):
  path = tmp_path / "noscores.gguf"
  writer = GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b", "ab"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(tj_gguf.GGUFError, match=r"noscores\.gguf: metadata field 'tokenizer\.ggml\.scores' is missing"):
    tj_gguf.tokenizer_from_gguf(path)
