"""The reports: a Markdown table, a bar chart (PNG) and JSON, each written atomically."""
import json
import math
from typing import Sequence

from unlearn_engine.atomic import atomic_path, write_text


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        return f"{100 * v:.1f}%" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bar_chart(rows: Sequence[dict], label: str, metrics: Sequence[str], path: str, title: str = ""):
    """Grouped bar chart of percentage metrics, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    colors = [(214, 39, 40), (255, 127, 14), (31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75)]
    width, height, left, bottom, top = max(640, 90 * len(rows) + 120), 420, 50, 90, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    plot_h = height - bottom - top
    draw.text((left, 10), title, fill="black", font=font)
    for pct in (0, 25, 50, 75, 100):
        y = top + plot_h * (1 - pct / 100)
        draw.line([(left, y), (width - 10, y)], fill=(220, 220, 220))
        draw.text((5, y - 6), f"{pct}%", fill="black", font=font)
    group = (width - left - 20) / max(len(rows), 1)
    bar = group * 0.8 / max(len(metrics), 1)
    for i, row in enumerate(rows):
        x0 = left + i * group + group * 0.1
        for j, m in enumerate(metrics):
            v = row.get(m)
            if isinstance(v, float) and math.isfinite(v):
                y = top + plot_h * (1 - v)
                draw.rectangle([x0 + j * bar, y, x0 + (j + 1) * bar - 2, top + plot_h], fill=colors[j % len(colors)])
        draw.text((x0, top + plot_h + 5), str(row[label])[:14], fill="black", font=font)
    for j, m in enumerate(metrics):
        x = left + j * 150
        draw.rectangle([x, height - 30, x + 10, height - 20], fill=colors[j % len(colors)])
        draw.text((x + 14, height - 32), m, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_json(obj, path: str) -> None:
    write_text(path, json.dumps(obj, indent=2))
