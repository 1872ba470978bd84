"""The report artefacts: the PNG is a real image, and the heatmap HTML says (parsed independently) what it should."""

from __future__ import annotations

import html.parser
import os
import re
import subprocess
import sys

import pytest

from tregjax.experiments import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


# ------------------------------------------------------------------------------------------------- plot


def _read_png(path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  return matplotlib.image.imread(path)


def test_plot_writes_png_with_nan_and_empty_panels(tmp_path):
  E = report.Estimate
  panels = [("accuracy", [E("reference", 0.41, 0.37, 0.46), E("DPO", 0.45, 0.41, 0.50), E("SimPO-REG", NAN, NAN, NAN),
                          E("no interval", 0.43, NAN, NAN)]),
            ("token-credit ROC-AUC", [E("contrastive", 0.73, 0.69, 0.78), E("oracle", 1.0, 1.0, 1.0)]),
            ("empty", []),
            ("all n/a", [E("a", NAN, NAN, NAN)])]
  path = str(tmp_path / "plot.png")
  assert report.plot(path, panels, title="t", reference_lines=(0.41, 0.5, None)) == path
  image = _read_png(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400
  assert image.std() > 0.01  # not a blank canvas
  assert os.listdir(tmp_path) == ["plot.png"]  # the tmp file was renamed, not left behind
  # a rerun replaces the file in place
  report.plot(path, [("one", [E("x", -0.2, -0.3, -0.1)])])
  assert _read_png(path).shape[1] < image.shape[1] and os.listdir(tmp_path) == ["plot.png"]


def test_plot_without_panels_and_bad_reference_lines(tmp_path):
  path = str(tmp_path / "nothing.png")
  report.plot(path, [])
  assert _read_png(path).size > 0
  with pytest.raises(ValueError):
    report.plot(str(tmp_path / "bad.png"), [("a", [])], reference_lines=(0.5, 0.5))
  assert sorted(os.listdir(tmp_path)) == ["nothing.png"]


def test_import_does_not_load_matplotlib():
  code = "import sys; import tregjax.experiments.report; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------- heatmap


class _Page(html.parser.HTMLParser):
  """Token spans (class "t"): their classes, attributes and text; and the whole text of each `div.toks`."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.spans: list[dict] = []
    self.toks: list[str] = []
    self._span = None
    self._toks_depth = 0  # >0 while inside a div.toks (counting nested tags)
    self.tags: list[str] = []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    attrs = dict(attrs)
    classes = (attrs.get("class") or "").split()
    if self._toks_depth:
      self._toks_depth += 1
    elif tag == "div" and "toks" in classes:
      self._toks_depth = 1
      self.toks.append("")
    if tag == "span" and "t" in classes:
      assert self._span is None, "token spans must not nest"
      self._span = dict(classes=classes, attrs=attrs, text="")

  def handle_endtag(self, tag):
    if self._toks_depth:
      self._toks_depth -= 1
    if tag == "span" and self._span is not None:
      self.spans.append(self._span)
      self._span = None

  def handle_data(self, data):
    if self._span is not None:
      self._span["text"] += data
    if self._toks_depth:
      self.toks[-1] += data


def _parse(path):
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  page = _Page()
  page.feed(raw)
  page.close()
  return raw, page


def _rgb(span):
  m = re.search(r"background:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", span["attrs"]["style"])
  assert m, span
  return tuple(int(x) for x in m.groups())


def _shown(token):
  """The rule the page promises: a visible "↵" before each newline; carriage return as its control picture "␍"."""
  return token.replace("\n", "\u21b5\n").replace("\r", "\u240d")


ROWS = [
    report.TokenRow("problem 17 · rejected · final answer wrong",
                    ["Tom", " has", " 29", " coins", ".\n", "29", " +", " 14", " =", " 31", ".", "\n", "The answer is",
                     " 31"],
                    [0.02, -0.01, 0.12345, 0.0, 0.004, 0.1, 0.05, 0.08, 0.03, -0.41, 0.0, 0.01, -0.02, -0.5],
                    [0, 0, 1, 0, 0, 1, 1, 1, 1, -1, 0, 0, 0, -1]),
    report.TokenRow("<b>tricky</b> & co",
                    ["<script>", "&amp;", "  two spaces", "é ∑ 漢", "", "a\r\nb", "\t"],
                    [0.5, -0.5, NAN, 0.0, 0.2, -0.2, 0.0],
                    [0, -1, 1, 0, 0, 1, 0]),
]


def test_heatmap_spans_match_tokens(tmp_path):
  path = str(tmp_path / "heatmap.html")
  assert report.heatmap(path, ROWS, title="arith <token rewards>", caption="r̂ = σ(...) − 0.5 & more") == path
  assert os.listdir(tmp_path) == ["heatmap.html"] and os.stat(path).st_mode & 0o044 == 0o044  # readable by others
  raw, page = _parse(path)
  tokens = [t for row in ROWS for t in row.tokens]
  labels = [l for row in ROWS for l in row.labels]
  assert len(page.spans) == len(tokens)
  for span, token, label in zip(page.spans, tokens, labels):
    assert span["text"] == _shown(token), (span, token)
    assert ("err" in span["classes"]) == (label == -1), (span, token)
    assert ("ok" in span["classes"]) == (label == 1), (span, token)
  # nothing but the tokens between and around the spans: stray whitespace would be rendered by pre-wrap
  assert page.toks == ["".join(_shown(t) for t in row.tokens) for row in ROWS]
  assert re.search(r"\.toks\s*\{[^}]*white-space:\s*pre-wrap", raw)


def test_heatmap_escapes_and_is_self_contained(tmp_path):
  path = report.heatmap(str(tmp_path / "h.html"), ROWS, title="<i>title</i>", caption="<b>caption</b>")
  raw, page = _parse(path)
  assert "<script" not in raw.lower() and "&lt;script&gt;" in raw
  assert "<b>" not in raw and "<i>" not in raw and "&lt;b&gt;tricky&lt;/b&gt; &amp; co" in raw
  assert "&amp;amp;" in raw  # the token "&amp;" shown as typed, not as "&"
  assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "p", "span"}
  assert not re.search(r"\b(src|href)\s*=|https?:|url\(|@import", raw)


def test_heatmap_colours_and_tooltips(tmp_path):
  path = report.heatmap(str(tmp_path / "h.html"), ROWS, title="t")
  raw, page = _parse(path)
  keys = [(i, row.tokens[j]) if row.tokens.count(row.tokens[j]) == 1 else (i, j)
          for i, row in enumerate(ROWS) for j in range(len(row.tokens))]
  spans = dict(zip(keys, page.spans))  # by (row, token), or (row, position) where a token repeats
  r, g, b = _rgb(spans[1, "<script>"])  # +0.5: green-dominant
  assert g > r + 60 and g > b + 60, (r, g, b)
  r, g, b = _rgb(spans[1, "&amp;"])  # -0.5: red-dominant
  assert r > g + 60 and r > b + 60, (r, g, b)
  assert _rgb(spans[0, " coins"]) == (255, 255, 255)  # 0: white
  # a small reward is still visibly coloured (the page's largest |r| is 0.5 here)
  r, g, b = _rgb(spans[0, "Tom"])
  assert g >= r and 255 - min(r, g, b) >= 30, (r, g, b)
  r, g, b = _rgb(spans[0, " has"])  # -0.01
  assert r >= g and 255 - min(r, g, b) >= 20, (r, g, b)
  # tooltips: the reward to 3 decimals, and the label
  assert "+0.123" in spans[0, " 29"]["attrs"]["title"] and "correct" in spans[0, " 29"]["attrs"]["title"]
  assert "-0.410" in spans[0, 9]["attrs"]["title"] and "error" in spans[0, 9]["attrs"]["title"]
  assert "-0.500" in spans[0, 13]["attrs"]["title"]
  assert "n/a" in spans[1, "  two spaces"]["attrs"]["title"]  # NaN reward: no crash, said so
  assert "0.500" in raw  # the legend states the colour scale


def test_heatmap_scale_follows_the_page(tmp_path):
  # all rewards tiny: the largest still gets full colour, and the legend says the scale
  row = report.TokenRow("small", ["a", "b", "c"], [0.02, -0.02, 0.0], [0, 0, 0])
  path = report.heatmap(str(tmp_path / "h.html"), [row], title="t")
  raw, page = _parse(path)
  r, g, b = _rgb(page.spans[0])
  assert g > r + 60 and g > b + 60, (r, g, b)
  r, g, b = _rgb(page.spans[1])
  assert r > g + 60 and r > b + 60, (r, g, b)
  assert "0.020" in raw


def test_heatmap_rejects_ragged_rows(tmp_path):
  row = report.TokenRow("bad", ["a", "b"], [0.1], [0, 0])
  with pytest.raises(ValueError, match="bad"):
    report.heatmap(str(tmp_path / "h.html"), [row], title="t")
  assert os.listdir(tmp_path) == []


def test_empty_heatmap(tmp_path):
  raw, page = _parse(report.heatmap(str(tmp_path / "h.html"), [], title="nothing"))
  assert page.spans == [] and "nothing" in raw and "(no rows)" in raw


def test_plot_failure_keeps_the_old_file(tmp_path, monkeypatch):
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "plot.png")
  report.plot(path, [("a", [report.Estimate("x", 0.5, 0.4, 0.6)])])
  with open(path, "rb") as f:
    before = f.read()

  def broken_savefig(self, f, **kwargs):
    f.write(b"half a png")
    raise OSError("disk full")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
  with pytest.raises(OSError, match="disk full"):
    report.plot(path, [("b", [report.Estimate("y", 0.1, 0.0, 0.2)])])
  with open(path, "rb") as f:
    assert f.read() == before
  assert os.listdir(tmp_path) == ["plot.png"]
