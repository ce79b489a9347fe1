"""The demo's chart: grouped bars of percentage metrics, each with its 95% interval and its value written on it,
drawn with Pillow (no plotting dependency)."""
import textwrap
from typing import List, Sequence

from unlearn_engine.atomic import atomic_path

COLORS = [(214, 39, 40), (255, 127, 14), (31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75)]


def interval_chart(rows: Sequence[dict], metrics: List[str], path: str, title: str = "") -> None:
    """rows: {"method": name, metric: {"mean", "lo", "hi"}}; one group of bars per row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    bar_w, gap, left, top, plot_h = 22, 26, 50, 40, 300
    group_w = bar_w * len(metrics) + gap
    width = left + group_w * len(rows) + 20
    label_lines = [textwrap.wrap(str(r["method"]), width=max(8, group_w // 7)) for r in rows]
    label_h = 14 * max(len(lines) for lines in label_lines)
    legend_h = 18 * ((len(metrics) + 2) // 3)
    height = top + plot_h + 10 + label_h + 16 + legend_h
    image = Image.new("RGB", (max(width, 600), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)
    base_y = top + plot_h
    for pct in (0, 25, 50, 75, 100):
        y = base_y - plot_h * pct / 100
        draw.line([(left, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{pct}%", fill="black", font=font)
    for i, row in enumerate(rows):
        x0 = left + i * group_w + gap // 2
        for j, metric in enumerate(metrics):
            cell = row[metric]
            x = x0 + j * bar_w
            y = base_y - plot_h * cell["mean"]
            draw.rectangle([x, y, x + bar_w - 3, base_y], fill=COLORS[j % len(COLORS)])
            if cell.get("lo") is not None:  # the interval as a whisker
                mid, y_lo, y_hi = x + (bar_w - 3) // 2, base_y - plot_h * cell["lo"], base_y - plot_h * cell["hi"]
                draw.line([(mid, y_lo), (mid, y_hi)], fill="black")
                draw.line([(mid - 3, y_lo), (mid + 3, y_lo)], fill="black")
                draw.line([(mid - 3, y_hi), (mid + 3, y_hi)], fill="black")
            draw.text((x, min(y, base_y - 10) - 11), f"{round(100 * cell['mean'])}", fill="black", font=font)
        for k, line in enumerate(label_lines[i]):
            draw.text((x0, base_y + 6 + 14 * k), line, fill="black", font=font)
    legend_y = base_y + 10 + label_h + 6
    for j, metric in enumerate(metrics):
        x, y = left + (j % 3) * 200, legend_y + 18 * (j // 3)
        draw.rectangle([x, y, x + 10, y + 10], fill=COLORS[j % len(COLORS)])
        draw.text((x + 14, y - 1), metric, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
