"""Take the user guide's screenshots from a real napari window.

Run under a display (Xvfb works):

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py docs/images

The model comes from the NAPARI_SCLIP_* environment variables, as in normal use; with the default
(ViT-B-16 / openai) the pictures show real SCLIP output.  ``--settings-only`` takes the two
pictures of the settings (01, 04), which need no weights; ``--review-only`` the review panel's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qtpy.QtWidgets import QApplication, QScrollArea

from napari_sclip.cli import open_gui


def pump(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def main(out: Path, settings_only: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    viewer, widget = open_gui([])
    window = viewer.window._qt_window
    window.resize(1400, 860)
    pump(2)
    widget.set_vocabulary(["person, astronaut", "flag", "sky, space", "rocket, space shuttle"])
    pump(0.5)
    window.grab().save(str(out / "01-widget.png"))
    widget._advanced.expand(animate=False)
    pump(0.5)
    settings = widget.findChild(QScrollArea).verticalScrollBar()
    settings.setValue(settings.maximum())  # the settings scroll: show all of Advanced
    pump(0.5)
    window.grab().save(str(out / "04-advanced.png"))
    widget._advanced.collapse(animate=False)
    if settings_only:  # no weights needed: the settings as a new user sees them
        viewer.close()
        return

    widget._run_button.click()
    while widget.running:
        pump(0.1)
    pump(0.5)
    window.grab().save(str(out / "02-segmented.png"))

    labels = viewer.layers["astronaut labels"]
    labels.mode = "paint"
    labels.brush_size = 40
    labels.selected_label = 2  # "flag": paint a correction
    for x in range(40, 140, 10):
        labels.paint((120, x), 2)
    widget.set_options(overwrite=False)
    widget.set_vocabulary(["person, astronaut", "flag", "sky, space", "rocket, space shuttle", "helmet"])
    widget._run_button.click()
    while widget.running:
        pump(0.1)
    pump(0.5)
    window.grab().save(str(out / "03-rerun-keeps-edits.png"))
    print(widget._status.text())
    viewer.close()


def review(out: Path) -> None:
    """The review panel on a dataset that ``napari-sclip segment`` made of the example photos."""
    import tempfile

    from napari_sclip.cli import main as cli
    from napari_sclip.cli import open_review_gui

    examples = Path(__file__).parent / "examples"
    dataset = Path(tempfile.mkdtemp()) / "photos-dataset"
    cli(["segment", str(examples / "astronaut.jpg"), str(examples / "coffee.jpg"), "--classes-file",
         str(examples / "classes.txt"), "--out", str(dataset), "--quiet"])
    viewer, panel = open_review_gui(str(dataset))
    window = viewer.window._qt_window
    window.resize(1400, 960)
    while panel.session is None or panel.session.opening:  # the index is read in a worker
        pump(0.1)
    viewer.layers[-1].opacity = 0.6
    pump(2)
    window.grab().save(str(out / "05-review.png"))
    panel.close_review()
    viewer.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images")
    if "--settings-only" in sys.argv:
        main(target, settings_only=True)
    elif "--review-only" not in sys.argv:
        main(target)
    if "--settings-only" not in sys.argv:
        review(target)
