"""One decoder block as an inline SVG, with the chosen adapter drawn where it sits.

The picture follows the LLM-Adapters figure: norm -> attention (q, k, v, o) -> residual add ->
norm -> MLP (gate, up, down) -> residual add. Frozen modules are grey; what trains is amber. What to
draw comes from the method's record (``core.methods``): its ``draw`` turns the settings into a
``Drawing`` (badges on trained projections, bottleneck boxes after or beside a block, virtual
key/value rows joining k and v, virtual tokens before the input), which this module renders without
knowing any method by name.

Which roles exist comes from ``core.arch``'s table (no gate on GPT-2, fused qkv on BLOOM ...), so the
drawing of each architecture is data too.
"""

from __future__ import annotations

import html
from typing import Any

from core import methods
from core.arch import ARCHITECTURES
from core.fields import ConfigError
from core.methods import Drawing

FROZEN = {"fill": "#eef2f7", "stroke": "#94a3b8", "text": "#334155"}
TRAIN = {"fill": "#fde68a", "stroke": "#d97706", "text": "#7c2d12"}
ABSENT = {"fill": "#ffffff", "stroke": "#cbd5e1", "text": "#94a3b8"}

WIDTH = 600
CX = 250  # centre of the main column
COL_W = 220


def _box(x: float, y: float, w: float, h: float, label: str, style: dict[str, str], *, dashed: bool = False,
         rx: int = 6, size: int = 13, bold: bool = False, title: str = "") -> str:
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    weight = ' font-weight="600"' if bold or style is TRAIN else ""
    tip = f"<title>{html.escape(title)}</title>" if title else ""
    return (f'<g>{tip}<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{rx}" fill="{style["fill"]}" '
            f'stroke="{style["stroke"]}" stroke-width="{2 if style is TRAIN else 1.2}"{dash}/>'
            f'<text x="{x + w / 2}" y="{y + h / 2 + size * 0.36}" text-anchor="middle" font-size="{size}" '
            f'fill="{style["text"]}"{weight}>{html.escape(label)}</text></g>')


def _line(x1: float, y1: float, x2: float, y2: float, *, color: str = "#64748b", arrow: bool = True,
          dashed: bool = False, width: float = 1.4) -> str:
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    head = ' marker-end="url(#arrow)"' if arrow else ""
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" stroke-width="{width}"'
            f'{dash}{head}/>')


def _path(d: str, *, color: str = "#64748b", arrow: bool = True, dashed: bool = False, width: float = 1.4) -> str:
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    head = ' marker-end="url(#arrow)"' if arrow else ""
    return f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"{dash}{head}/>'


def _text(x: float, y: float, label: str, *, size: int = 12, color: str = "#475569", anchor: str = "middle",
          italic: bool = False, bold: bool = False) -> str:
    style = ' font-style="italic"' if italic else ""
    weight = ' font-weight="600"' if bold else ""
    return (f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="{size}" fill="{color}"{style}{weight}>'
            f'{html.escape(label)}</text>')


def _plus(x: float, y: float) -> str:
    return (f'<circle cx="{x}" cy="{y}" r="10" fill="#ffffff" stroke="#64748b" stroke-width="1.4"/>'
            f'<text x="{x}" y="{y + 5}" text-anchor="middle" font-size="16" fill="#334155">+</text>')


def available_roles(model_type: str | None) -> set[str]:
    """The roles a diagram can show for ``model_type`` (all of them when unknown)."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        return {"q", "k", "v", "o", "gate", "up", "down"}
    roles = set(spec.roles) - {"qkv"}
    return roles | ({"q", "k", "v"} if spec.fused else set())


def _drawing(method: str, settings: dict[str, Any]) -> tuple[Drawing, bool]:
    """(what ``method`` draws for ``settings``, whether it acts on every layer at once)."""
    try:
        m = methods.get(method)
    except ConfigError:
        return Drawing(caption=str(method)), True
    return m.draw(settings), m.all_layers_only


def describe(method: str, settings: dict[str, Any], layers: Any = "all", num_layers: int | None = None) -> str:
    """One line saying where the adapter sits, e.g. ``LoRA (r=32) on q, k, v, up, down in all 30 layers``."""
    drawing, all_layers = _drawing(method, settings)
    return drawing.caption if all_layers else f"{drawing.caption} {_layers_text(layers, num_layers)}"


def _layers_text(layers: Any, num_layers: int | None) -> str:
    text = str(layers).strip() if not isinstance(layers, list) else ",".join(map(str, layers))
    if text.lower() in ("", "all"):
        return f"in all {num_layers} layers" if num_layers else "in every layer"
    return f"in layers {text}" + (f" of {num_layers}" if num_layers else "")


def block_diagram(method: str, settings: dict[str, Any] | None = None, layers: Any = "all",
                  model_type: str | None = None, num_layers: int | None = None) -> str:
    """The SVG (as an HTML string) of one decoder block with ``method``'s adapter highlighted.

    ``settings`` are the method's settings as a dict; a half-filled form still draws (each method's
    ``draw`` reads what it needs with safe defaults).
    """
    s = dict(settings or {})
    roles = available_roles(model_type)
    spec = ARCHITECTURES.get(model_type or "")
    fused = bool(spec and spec.fused)
    d, all_layers = _drawing(method, s)
    marks = {role: mark for role, mark in d.marks.items() if role in roles}
    series = {b.block: b for b in d.boxes if b.joins == "series"}
    parallel = {b.block: b for b in d.boxes if b.joins == "parallel"}

    def projection(role: str) -> tuple[str, dict[str, str]]:
        """A projection's label and style: a badge and amber when the adapter trains it."""
        if role in marks:
            return f"{role} {marks[role]}", TRAIN
        return role, FROZEN

    out: list[str] = []
    add = out.append
    x0 = CX - COL_W / 2
    amber = TRAIN["stroke"]

    # Input embeddings and virtual tokens before them.
    add(_box(x0, 14, COL_W, 32, "token embeddings", FROZEN))
    if d.input_tokens:
        add(_box(x0 + COL_W + 60, 14, 165, 32, d.input_tokens, TRAIN,
                 title="trainable embeddings prepended to the input"))
        if d.input_note:
            add(_text(x0 + COL_W + 142, 62, d.input_note, size=11, italic=True))
        add(_line(x0 + COL_W + 60, 30, x0 + COL_W + 4, 30, color=amber))
        add(_text(x0 + COL_W + 32, 24, "prepend", size=10, color=amber))

    y = 84  # the layer input
    add(_line(CX, 46, CX, y))
    frame_top = 70
    add(_text(x0 - 60, 88, "decoder layer" + (f" × {num_layers}" if num_layers else " × N"), size=12,
              anchor="start", bold=True))
    if not all_layers:
        add(_text(x0 - 60, 104, _layers_text(layers, num_layers).replace("in ", "adapted: ", 1), size=11,
                  anchor="start", color=amber))

    # Attention half.
    y_res1, y_norm1, y_attn = y, y + 36, y + 86
    attn_h = 112
    _norm_and_frame(out, x0, y_res1, y_norm1, y_attn, attn_h, "self-attention")
    bw = (COL_W - 40) / 3
    centres = {}
    for i, role in enumerate("qkv"):
        bx = x0 + 10 + i * (bw + 10)
        centres[role] = (bx, bx + bw)
        label, style = projection(role)
        label += " ⧺ P" if d.kv_tokens and role in "kv" else ""
        add(_box(bx, y_attn + 24, bw, 26, label, style, size=12,
                 title=("fused qkv projection" if fused else f"{role}_proj")))
    if fused:
        add(_text(CX, y_attn + 62, "(one fused qkv projection)", size=10, italic=True))
    add(_text(CX, y_attn + 74 if fused else y_attn + 66, "softmax(q kᵀ / √d) v", size=11, italic=True))
    add(_box(x0 + 50, y_attn + 80, COL_W - 100, 24, *projection("o"), size=12))
    y_attn_out = y_attn + attn_h
    if d.kv_tokens:
        px = x0 + COL_W + 50
        add(_box(px, y_attn + 22, 180, 30, d.kv_tokens, TRAIN,
                 title="trainable key/value positions prepended in every attention layer"))
        add(_line(px, y_attn + 37, centres["v"][1] + 2, y_attn + 37, color=amber))
        k_mid = (centres["k"][0] + centres["k"][1]) / 2
        add(_path(f"M {px + 20} {y_attn + 22} V {y_attn + 10} H {k_mid} V {y_attn + 22}", color=amber))
        add(_text(px + 90, y_attn + 68, "joins k and v in every layer", size=11, italic=True, color=amber))
    y = y_attn_out
    if "attn" in series:
        y = _series_box(out, x0, y, series["attn"].label)
    y_add1 = y + 30
    add(_line(CX, y, CX, y_add1 - 10))
    if "attn" in parallel:
        _parallel(out, x0, y_norm1 + 34, y_attn_out - 8, parallel["attn"].label, parallel["attn"].scale)
    add(_path(f"M {CX} {y_res1} H {x0 - 30} V {y_add1} H {CX - 14}"))  # residual around attention
    add(_text(x0 - 36, (y_res1 + y_add1) / 2, "residual", size=11, anchor="end", italic=True))
    add(_plus(CX, y_add1))

    # MLP half.
    y_norm2 = y_add1 + 34
    y_mlp = y_norm2 + 48
    mlp_h = 90
    _norm_and_frame(out, x0, y_add1 + 10, y_norm2, y_mlp, mlp_h, "MLP")
    half = (COL_W - 30) / 2
    for i, role in enumerate(("gate", "up")):
        bx = x0 + 10 + i * (half + 10)
        if role not in roles:
            add(_box(bx, y_mlp + 22, half, 26, f"({role}: none)", ABSENT, dashed=True, size=11))
            continue
        add(_box(bx, y_mlp + 22, half, 26, *projection(role), size=12))
    add(_box(x0 + 50, y_mlp + 58, COL_W - 100, 24, *projection("down"), size=12))
    y = y_mlp + mlp_h
    if "mlp" in series:
        y = _series_box(out, x0, y, series["mlp"].label)
    y_add2 = y + 30
    add(_line(CX, y, CX, y_add2 - 10))
    if "mlp" in parallel:
        _parallel(out, x0, y_norm2 + 34, y_mlp + mlp_h - 8, parallel["mlp"].label, parallel["mlp"].scale)
    add(_path(f"M {CX} {y_add1 + 20} H {x0 - 30} V {y_add2} H {CX - 14}"))
    add(_text(x0 - 36, (y_add1 + y_add2) / 2 + 8, "residual", size=11, anchor="end", italic=True))
    add(_plus(CX, y_add2))
    frame_bottom = y_add2 + 24
    add(f'<rect x="{x0 - 70}" y="{frame_top}" width="{WIDTH - (x0 - 70) - 6}" height="{frame_bottom - frame_top}" '
        f'rx="10" fill="none" stroke="#cbd5e1" stroke-dasharray="6 4"/>')
    add(_line(CX, y_add2 + 10, CX, frame_bottom + 22))
    add(_text(CX, frame_bottom + 38, "next layer → final norm → LM head", size=11, italic=True))

    # Legend.
    ly = frame_bottom + 26
    add(_box(x0 + COL_W + 70, ly, 16, 14, "", FROZEN, rx=3))
    add(_text(x0 + COL_W + 92, ly + 12, "frozen", size=11, anchor="start"))
    add(_box(x0 + COL_W + 150, ly, 16, 14, "", TRAIN, rx=3))
    add(_text(x0 + COL_W + 172, ly + 12, "trained", size=11, anchor="start"))
    height = frame_bottom + 50

    defs = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#64748b"/></marker></defs>')
    caption = html.escape(describe(method, s, layers, num_layers))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" '
           f'style="max-width:{WIDTH}px;font-family:ui-sans-serif,system-ui,sans-serif" role="img" '
           f'aria-label="{caption}">{defs}{"".join(out)}</svg>')
    return (f'<div class="block-diagram"><div style="font-size:13px;margin:0 0 6px 0;color:#92400e">'
            f'<b>Where it sits:</b> {caption}</div>{svg}</div>')


def _norm_and_frame(out: list[str], x0: float, y_from: float, y_norm: float, y_block: float, height: float,
                    title: str) -> None:
    """The path from ``y_from`` through a frozen norm into the frame of a sub-block (attention or MLP)."""
    out.append(_line(CX, y_from, CX, y_norm))
    out.append(_box(x0 + 40, y_norm, COL_W - 80, 26, "norm", FROZEN, size=12))
    out.append(_line(CX, y_norm + 26, CX, y_block))
    out.append(f'<rect x="{x0}" y="{y_block}" width="{COL_W}" height="{height}" rx="8" fill="#f8fafc" '
               f'stroke="#94a3b8"/>')
    out.append(_text(x0 + 8, y_block + 15, title, size=11, anchor="start", bold=True))


def _series_box(out: list[str], x0: float, y: float, label: str) -> float:
    """A series adapter box on the main path below ``y``; returns where the path continues."""
    out.append(_line(CX, y, CX, y + 14))
    out.append(_box(x0 + 30, y + 14, COL_W - 60, 28, label, TRAIN))
    return y + 42


def _parallel(out: list[str], x0: float, y_in: float, y_out: float, label: str, scale: str | None) -> None:
    """A parallel adapter box right of a block, fed from the block input and summed into its output."""
    bx = x0 + COL_W + 50
    mid = (y_in + y_out) / 2
    out.append(_path(f"M {CX} {y_in} H {bx + 80} V {mid - 16}", color=TRAIN["stroke"]))
    out.append(_box(bx, mid - 16, 160, 32, label, TRAIN))
    out.append(_path(f"M {bx + 80} {mid + 16} V {y_out} H {x0 + COL_W + 4}", color=TRAIN["stroke"]))
    if scale is not None:
        out.append(_text(bx + 86, y_out - 4, f"× {scale}", size=11, anchor="start", color=TRAIN["stroke"]))
