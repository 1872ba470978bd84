"""The experiment's report artefacts: a PNG of estimates with their 95% intervals, and an HTML token-reward heatmap.

Both are meant to be looked at by a person, so both say what they show: every number on the plot carries its interval
and its printed value; the heatmap's colours are scaled to the page (a reward of 0.02 must still be visible) and the
legend states that scale. Both files are written atomically (`tregjax.storage`): a killed run never leaves a
half-written artefact that a reader could mistake for the result. matplotlib is imported only inside `plot`, so
importing this module is cheap and never needs a display.
"""

from __future__ import annotations

import dataclasses
import html
import math
import textwrap
from collections.abc import Sequence

from tregjax import storage

NEWLINE_MARK = "\u21b5"  # "↵": shown before every newline of a token (the newline itself is kept)

_RED = (200, 30, 30)     # r̂ = -scale
_GREEN = (20, 140, 50)   # r̂ = +scale
_LABELS = {-1: "error (−1)", 1: "correct (+1)", 0: "unlabelled (0)"}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """One figure of the report with its 95% interval (NaN where it could not be measured)."""
  name: str
  value: float
  low: float  # 95% interval
  high: float


@dataclasses.dataclass(frozen=True)
class TokenRow:
  """One response of the heatmap: its tokens, T-REG's token rewards r̂_t and the oracle's per-token truth."""
  title: str  # e.g. "problem 17 · rejected · final answer wrong"
  tokens: Sequence[str]  # token strings as decoded (may contain spaces, newlines, <, >, &, unicode)
  rewards: Sequence[float]  # r̂_t in [-0.5, 0.5] (the T-REG token reward), same length as tokens
  labels: Sequence[int]  # oracle truth per token: -1 error, +1 correct, 0 unlabelled


# ------------------------------------------------------------------------------------------------- shared


def _finite(x: float | None) -> bool:
  """True for a real, finite number (numpy scalars included); False for None, NaN and ±inf."""
  try:
    return x is not None and math.isfinite(float(x))
  except (TypeError, ValueError):
    return False




# ------------------------------------------------------------------------------------------------- plot


def plot(path: str, panels: Sequence[tuple[str, Sequence[Estimate]]], *, title: str = "",
         reference_lines: Sequence[float | None] = ()) -> str:
  """One PNG: a dot + 95% error-bar panel per (panel title, estimates), side by side; returns `path`.

  Each estimate's value is printed next to its interval (3 decimals) so the figure can be read without a ruler; a
  value that could not be measured (NaN) is written "n/a" rather than silently dropped. `reference_lines[i]`, if
  given and finite, is drawn as a dashed vertical line in panel i (e.g. the reference policy's accuracy, or 0.5 =
  chance for an AUC) and stated under the axis.
  """
  if len(reference_lines) > len(panels):
    raise ValueError(f"{len(reference_lines)} reference lines for {len(panels)} panels")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = list(panels) or [("", [])]
  references = list(reference_lines) + [None] * (len(panels) - len(reference_lines))
  rows = max(1, max(len(estimates) for _, estimates in panels))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 1.4 + 0.5 * rows), squeeze=False,
                           layout="constrained")
  try:
    for ax, (panel_title, estimates), reference in zip(axes[0], panels, references):
      _panel(ax, panel_title, list(estimates), reference if _finite(reference) else None, rows)
    if title:
      fig.suptitle(title, fontsize=13)
    with storage.atomic_file(path) as f:
      fig.savefig(f, format="png", dpi=150)
  finally:
    plt.close(fig)
  return path


def _panel(ax, panel_title: str, estimates: list[Estimate], reference: float | None, rows: int) -> None:
  """One panel: first estimate on top, dot at the value, bar over the interval, the value printed to its right."""
  ax.set_title("\n".join(textwrap.wrap(panel_title, 60)) or " ", fontsize=11)
  ax.set_ylim(rows - 0.5, -0.5)
  ax.grid(axis="x", color="0.9", linewidth=0.8)
  ax.set_axisbelow(True)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)
  if not estimates:
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no estimates", transform=ax.transAxes, ha="center", va="center", color="0.45",
            fontstyle="italic")
    return
  ax.set_yticks(range(len(estimates)), ["\n".join(textwrap.wrap(e.name, 28)) or "?" for e in estimates], fontsize=10)
  xs = [x for e in estimates for x in (e.value, e.low, e.high) if _finite(x)]
  if reference is not None:
    xs.append(reference)
  lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
  span = hi - lo if hi > lo else max(abs(hi), 0.1)
  ax.set_xlim(lo - 0.06 * span, hi + 0.32 * span)  # room on the right for the printed values
  # no ticks in that room: an AUC axis that reads "1.1" would suggest values that cannot occur
  ax.set_xticks([t for t in ax.get_xticks() if lo - 0.06 * span <= t <= hi + 0.04 * span])
  if reference is not None:
    ax.axvline(reference, color="0.35", linestyle="--", linewidth=1.2, zorder=1)
    ax.set_xlabel(f"dashed line: {reference:.3f}", fontsize=9, color="0.3")
  for y, e in enumerate(estimates):
    if not _finite(e.value):
      ax.text(0.02, y, "n/a", transform=ax.get_yaxis_transform(), va="center", ha="left", color="0.4",
              fontstyle="italic", fontsize=10)
      continue
    value = float(e.value)
    if _finite(e.low) and _finite(e.high):
      err = [[max(0.0, value - e.low)], [max(0.0, e.high - value)]]
      ax.errorbar([value], [y], xerr=err, fmt="none", ecolor="#1f4e79", elinewidth=2.2, capsize=5, capthick=1.6,
                  zorder=2)
    ax.plot([value], [y], "o", color="#1f77b4", markeredgecolor="#0b2a44", markersize=8, zorder=3)
    right = max([value] + [x for x in (e.low, e.high) if _finite(x)])
    ax.annotate(f"{value:.3f}", (right, y), xytext=(7, 0), textcoords="offset points", va="center", ha="left",
                fontsize=10, fontweight="bold", color="#0b2a44")


# ------------------------------------------------------------------------------------------------- heatmap


def reward_colour(reward: float, scale: float) -> tuple[int, int, int]:
  """Background rgb of a token: white at 0, red below, green above, full colour at |r̂| = scale.

  Intensity is sqrt(|r̂| / scale), so a reward a tenth of the page's largest still gets a third of the colour.
  """
  if not _finite(reward):
    return (225, 225, 225)
  t = min(1.0, math.sqrt(abs(reward) / scale)) if scale > 0 else 0.0
  target = _GREEN if reward > 0 else _RED
  return tuple(round(255 + t * (c - 255)) for c in target)


def visible_text(token: str) -> str:
  """The text a token's span shows: "↵" before each newline, other control characters as their Unicode pictures."""
  out = []
  for ch in token:
    if ch == "\n":
      out.append(NEWLINE_MARK + "\n")
    elif ch != "\t" and (ord(ch) < 0x20 or ord(ch) == 0x7F):
      out.append(chr(0x2400 + ord(ch)) if ord(ch) < 0x20 else "\u2421")
    else:
      out.append(ch)
  return "".join(out)


def _page_scale(rows: Sequence[TokenRow]) -> float:
  """The |r̂| that gets full colour: the page's largest, capped at 0.5 (the reward's range), never below 1e-3."""
  largest = max((abs(float(r)) for row in rows for r in row.rewards if _finite(r)), default=0.5)
  return min(0.5, max(largest, 1e-3))


def _token_span(token: str, reward: float, label: int, scale: float, index: int) -> str:
  r, g, b = reward_colour(reward, scale)
  dark = _finite(reward) and math.sqrt(min(1.0, abs(reward) / scale)) > 0.72
  classes = "t" + {-1: " err", 1: " ok"}.get(int(label), "")
  value = f"{reward:+.3f}" if _finite(reward) else "n/a"
  tip = f"#{index} · r̂ = {value} · label: {_LABELS.get(int(label), str(label))} · token: {token!r}"
  style = f"background:rgb({r},{g},{b})" + (";color:#fff" if dark else "")
  return (f'<span class="{classes}" style="{style}" title="{html.escape(tip, quote=True)}">'
          f"{html.escape(visible_text(token), quote=False)}</span>")


def _row_summary(row: TokenRow) -> str:
  parts = [f"{len(row.tokens)} tokens"]
  for label, name in ((-1, "error"), (1, "correct")):
    values = [float(r) for r, l in zip(row.rewards, row.labels) if int(l) == label and _finite(r)]
    if values:
      parts.append(f"{len(values)} {name}, mean r̂ {sum(values) / len(values):+.3f}")
  return " · ".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 20px 28px;
       color: #1a1a1a; background: #fafafa; max-width: 1400px; }
h1 { font-size: 19px; margin: 0 0 8px; }
.legend { font-size: 13px; line-height: 1.6; background: #fff; border: 1px solid #ddd; border-radius: 6px;
          padding: 8px 12px; margin-bottom: 14px; }
.legend p { margin: 3px 0; }
.scale { display: inline-flex; vertical-align: middle; margin: 0 6px; border: 1px solid #bbb; }
.scale span { display: inline-block; width: 44px; text-align: center; font: 11px/20px ui-monospace, "DejaVu Sans Mono",
              monospace; }
.key { font: 14px/1.9 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; padding: 0 3px;
       background: #fff; }
.caption { color: #444; }
.row { background: #fff; border: 1px solid #e2e2e2; border-radius: 6px; padding: 6px 12px 10px; margin: 0 0 10px; }
.row h2 { font-size: 13.5px; font-weight: 600; margin: 2px 0 0; }
.row .meta { font-size: 12px; color: #666; margin: 0 0 4px; }
.toks { font: 14px/2.0 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
        overflow-wrap: anywhere; }
.t { box-shadow: inset -1px 0 0 rgba(0, 0, 0, 0.10); padding: 2px 0; }
.t:empty::before { content: "\\2205"; color: #999; }
.err, .key.err { outline: 2.5px solid #111; outline-offset: -1px; font-weight: 700; }
.ok, .key.ok { border-bottom: 2px dashed #0a6b2a; }
"""


def heatmap(path: str, rows: Sequence[TokenRow], *, title: str, caption: str = "") -> str:
  """A self-contained HTML page (inline CSS, no JS, nothing external) of token rewards on responses; returns `path`.

  Each token is a span whose background encodes r̂ (diverging red / white / green, scaled to the page's largest |r̂|
  so small rewards stay visible), whose tooltip gives the exact reward and label, and whose outline shows the oracle's
  label (thick dark: error, dashed green underline: correct). Newlines show as "↵" and still break the line; spaces
  are kept (white-space: pre-wrap), so what you see is the token text, not a cleaned-up version of it.
  """
  for i, row in enumerate(rows):
    if not len(row.tokens) == len(row.rewards) == len(row.labels):
      raise ValueError(f"row {i} ({row.title!r}): {len(row.tokens)} tokens, {len(row.rewards)} rewards, "
                       f"{len(row.labels)} labels")
  scale = _page_scale(rows)
  stops = [-1.0, -0.5, -0.2, -0.05, 0.0, 0.05, 0.2, 0.5, 1.0]
  swatches = "".join(
      f'<span style="background:rgb{reward_colour(s * scale, scale)}'
      f'{";color:#fff" if math.sqrt(abs(s)) > 0.72 else ""}">{s * scale:+.2f}</span>' for s in stops)
  esc = html.escape
  parts = [
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
      f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", '<div class="legend">',
      f"<p>Background: token reward r̂ — red negative, white 0, green positive "
      f'<span class="scale">{swatches}</span> colour saturates at |r̂| = {scale:.3f} (the largest |r̂| on this page; '
      f"intensity ∝ √(|r̂| / {scale:.3f}), so small rewards stay visible). "
      "Hover a token for its exact r̂ and label.</p>",
      f'<p>Oracle labels: <span class="key err">error</span> thick dark outline (−1) · '
      f'<span class="key ok">correct</span> dashed green underline (+1) · no mark: unlabelled (0). '
      f"Whitespace is shown as is; {NEWLINE_MARK} marks a newline inside a token.</p>",
  ]
  if caption:
    parts.append(f'<p class="caption">{esc(caption)}</p>')
  parts.append("</div>")
  for row in rows:
    spans = "".join(_token_span(str(t), float(r) if r is not None else math.nan, int(l), scale, i)
                    for i, (t, r, l) in enumerate(zip(row.tokens, row.rewards, row.labels)))
    parts.append(f'<div class="row"><h2>{esc(row.title)}</h2><div class="meta">{esc(_row_summary(row))}</div>'
                 f'<div class="toks">{spans}</div></div>')
  if not rows:
    parts.append('<p class="caption">(no rows)</p>')
  parts.append("</body></html>\n")
  text = "\n".join(parts)
  storage.write_text(path, text)
  return path
