"""Reward-history plots drawn with PIL alone (no plotting library needed inside ComfyUI)."""
from __future__ import annotations

from PIL import Image, ImageDraw

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def plot_curves(curves: dict[str, list[float]], title: str = "", size=(640, 360), ylabel: str = "",
                xlabel: str = "iteration", xticks: tuple | None = None) -> Image.Image:
    """Line plot of named curves over iterations, with min/max labels on the y axis."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    values = [v for ys in curves.values() for v in ys if v == v and abs(v) != float("inf")]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(ys) for ys in curves.values()), default=1)
    x0, y0, x1, y1 = left, top, w - right, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))

    def px(i, v):
        return (x0 + (x1 - x0) * (i / max(n - 1, 1)), y1 - (y1 - y0) * ((v - lo) / (hi - lo)))

    for k, (name, ys) in enumerate(curves.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [px(i, v) for i, v in enumerate(ys) if v == v]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((x0 + 6, y0 + 4 + 12 * k), name, fill=color)
    draw.text((4, y0), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((4, y1 - 10), f"{lo:.3g}", fill=(0, 0, 0))
    first, last = xticks or (0, n - 1)
    draw.text((x0, y1 + 6), str(first), fill=(0, 0, 0))
    draw.text((x1 - 24, y1 + 6), str(last), fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 24, y1 + 18), xlabel, fill=(0, 0, 0))
    draw.text((x0, 8), (title + (f"  ({ylabel})" if ylabel else "")).strip(), fill=(0, 0, 0))
    return img


def plot_reno_history(history: dict, title: str = "ReNO reward loss (lower is better)") -> Image.Image:
    """The total reward loss of every batch item per iteration."""
    totals = history.get("total", [])
    items = len(totals[0]) if totals else 0
    curves = {f"item {b}": [row[b] for row in totals] for b in range(items)}
    return plot_curves(curves, title)


def plot_search_history(history: dict, title: str = "Search: reward of x0 predictions (higher is better)") -> Image.Image:
    """Best and mean particle reward of every item at each scoring step (every step with ``trace``)."""
    rows = history.get("trace") or {}
    steps = sorted(map(int, rows)) if rows else history.get("scored_steps", [])
    table = [rows[str(s)] for s in steps] if rows else history.get("reward", [])
    items = len(table[0]) if table else 0
    curves = {}
    for b in range(min(items, 4)):
        curves[f"item {b} best"] = [max(row[b]) for row in table]
        curves[f"item {b} mean"] = [sum(row[b]) / len(row[b]) for row in table]
    events = [e["step"] for e in history.get("events", [])]
    label = "step" + (f" (resampled/pruned after {', '.join(map(str, events[:8]))})" if events else "")
    return plot_curves(curves, title, xlabel=label, xticks=(steps[0], steps[-1]) if steps else None)


def side_by_side(images: list[Image.Image], pad: int = 8) -> Image.Image:
    """Panels in one row (e.g. one plot per model, each on its own axes), top-aligned on white."""
    w = sum(im.width for im in images) + pad * (len(images) - 1)
    out = Image.new("RGB", (w, max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + pad
    return out


def count_chart(groups: list[str], counts: dict[str, list[int]], total: int, title: str = "",
                width: int = 720) -> Image.Image:
    """Horizontal bars: for each group (a prompt), one bar per series (a method) of ``count`` out of ``total``,
    the count written at the bar's end. Shows at a glance what a table of k/n per prompt says."""
    series = list(counts)
    label_w, right, top, bar_h, gap = 300, 40, 34, 14, 12
    group_h = bar_h * len(series) + gap
    height = top + group_h * len(groups) + 24
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x0, x1 = label_w, width - right
    draw.text((8, 8), title, fill=(0, 0, 0))
    for k, name in enumerate(series):   # legend
        color = _COLORS[k % len(_COLORS)]
        lx = x0 + 130 * k
        draw.rectangle([lx, 22, lx + 10, 30], fill=color)
        draw.text((lx + 14, 20), name, fill=color)
    for g, group in enumerate(groups):
        y = top + g * group_h
        text = group if len(group) <= 52 else group[:49] + "..."
        draw.text((8, y + (bar_h * len(series)) // 2 - 6), text, fill=(0, 0, 0))
        for k, name in enumerate(series):
            value = counts[name][g]
            color = _COLORS[k % len(_COLORS)]
            yy = y + k * bar_h
            end = x0 + (x1 - x0) * value / max(total, 1)
            draw.rectangle([x0, yy + 1, max(end, x0 + 1), yy + bar_h - 2], fill=color)
            draw.text((end + 4, yy + 1), f"{value}/{total}", fill=(0, 0, 0))
    y_axis = top + group_h * len(groups)
    draw.line([(x0, top - 2), (x0, y_axis)], fill=(0, 0, 0))
    for t in range(0, total + 1, max(1, total // 4)):
        x = x0 + (x1 - x0) * t / max(total, 1)
        draw.line([(x, y_axis), (x, y_axis + 4)], fill=(0, 0, 0))
        draw.text((x - 3, y_axis + 6), str(t), fill=(0, 0, 0))
    return img
