"""The per-class IoU chart of a report, drawn with Pillow (no plotting library to install)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from napari_sclip.evaluate.run import Report, percent

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_BAR, _GAP, _HEIGHT, _LEFT, _TOP, _LEGEND = 9, 10, 300, 44, 40, 230


def plot_report(report: Report, path: Path) -> None:
    """Write :func:`report_chart` as a PNG file (atomically)."""
    from napari_sclip._files import atomic_write_bytes

    atomic_write_bytes(path, chart_png(report))


def chart_png(report: Report) -> bytes:
    """The PNG bytes of :func:`report_chart`."""
    buffer = io.BytesIO()
    report_chart(report).save(buffer, format="PNG")
    return buffer.getvalue()


def report_chart(report: Report):
    """Per-class IoU bars as a Pillow image: one bar per method (its best setting) for each
    class, a 0-100 axis, and each method's mIoU in the legend.  A class a method cannot score
    (absent from prediction and ground truth) gets no bar."""
    from PIL import Image, ImageDraw, ImageFont

    best = report.best_by_method()
    names = report.results[0][1].class_names
    font = ImageFont.load_default()
    label_width = max(int(font.getlength(name)) for name in names) + 8
    group = len(best) * _BAR + _GAP
    width = _LEFT + group * len(names) + _GAP
    legend_width = 16 + _LEGEND * len(best)
    image = Image.new("RGB", (max(width, legend_width), _TOP + _HEIGHT + label_width), "white")
    draw = ImageDraw.Draw(image)
    bottom = _TOP + _HEIGHT
    for tick in range(0, 101, 20):  # the axis and its grid
        y = bottom - _HEIGHT * tick // 100
        draw.line([(_LEFT - 4, y), (width, y)], fill=(225, 225, 225) if tick else "black")
        draw.text((4, y - 6), f"{tick:>3}", fill="black", font=font)
    for m, (method, (setting, scores)) in enumerate(best.items()):
        colour = _COLOURS[m % len(_COLOURS)]
        for c, iou in enumerate(scores.iou):
            if not math.isnan(iou):
                x = _LEFT + _GAP + c * group + m * _BAR
                draw.rectangle([x, bottom - round(_HEIGHT * iou), x + _BAR - 2, bottom], fill=colour)
        legend = f"{method}: {percent(scores.miou)} mIoU (threshold {setting.prob_threshold:g})"
        x = 8 + m * _LEGEND
        draw.rectangle([x, 8, x + 10, 18], fill=colour)
        draw.text((x + 14, 7), legend, fill="black", font=font)
    draw.text((8, 22), f"IoU (%) per class: {report.truth}"[:120], fill="black", font=font)
    for c, name in enumerate(names):  # class names, written downwards under their groups
        text = Image.new("RGB", (label_width, 12), "white")
        ImageDraw.Draw(text).text((0, 0), name, fill="black", font=font)
        image.paste(text.rotate(-90, expand=True), (_LEFT + _GAP + c * group, bottom + 4))
    return image
