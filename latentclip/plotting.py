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
