"""How long napari's GUI thread stalls from a fresh start: opening the widget, the engine's import,
the first click on Segment, and landing the result.

Run from the repository root under a display (Xvfb works):

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_responsiveness.py --runs 5

Every measurement runs in a fresh interpreter that has imported neither torch nor open_clip.  A
10 ms QTimer ticks on the GUI thread; a gap between two ticks is a stall the user would feel (a
gap belongs to the phase that holds its middle).

* ``import``: the GIL bursts of importing the engine while napari shows an image, for each design
  (``--designs``): on the GUI thread (the old first click); in a thread as it is; with a 1 ms
  switch interval; with the garbage collector paused, then re-enabled, or with what the import
  made moved to the oldest generation without a collection (freeze, then unfreeze); with full
  collections deferred to one at the end (young ones still run); with libtorch loaded with the
  GIL released; with both of these (the widget's ``load_engine``), also with a 1 ms switch
  interval; or in a subprocess.  Meanwhile the GUI thread runs 10 ms of Python every 100 ms (as
  napari does when it repaints or reacts to a click); how long that takes during the import
  shows how the import's Python competes for the GIL.  After the import: the time napari takes to
  remove a layer, twice (it runs a full garbage collection each time, and that grows with the
  objects in the process and how they lie in memory).
* ``dlopen``: does loading ``libtorch`` stall other threads?  A plain process (no Qt) whose main
  thread wakes every millisecond while a thread loads libtorch with ``ctypes.CDLL`` (CPython's own
  ``dlopen``) or with the C library's ``dlopen`` called as a ctypes foreign function.
* ``flow``: napari with a 2D RGB image; the widget opened, classes typed, the real Segment button
  clicked (``QTest.mouseClick``) ``--click-after`` seconds after opening, the labels awaited; then
  one class typed more and a re-run.  The tiny test model, saved to a checkpoint and loaded through
  the engine's own code: the GUI thread's work does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("gui-thread", "thread", "switch-1ms", "gc-paused", "gc-paused+promoted", "full-gc-deferred",
           "dlopen-no-gil", "load_engine", "load_engine+switch-1ms", "subprocess")
SIZES = {"1 MP": (1000, 1000), "4 MP": (2000, 2000), "12 MP": (3000, 4000)}
#: The flow's marks, in order; each phase runs from one mark to the next.
MARKS = ("open", "opened", "first click", "first engine ready", "first model loaded", "first returned",
         "first landed", "idle", "rerun click", "rerun returned", "rerun landed", "end")
PHASES = ("open the widget", "type classes, wait to click", "click -> engine imported",
          "load the model", "segment (worker)", "landing (new layer)", "idle 1 s", "type one class more",
          "re-run (worker)", "re-run: landing (banded writes)", "idle 1 s after re-run")


# -- in the fresh child process -----------------------------------------------------------------


def _watch_imports(tiny_config: str | None) -> dict:
    """Record whether the main thread first imports torch and open_clip; register the tiny model
    with open_clip right after open_clip's own import (so nothing is imported early for it)."""
    import importlib.abc
    import importlib.machinery
    import threading

    on_main_thread: dict = {}

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in ("torch", "open_clip") or name in on_main_thread:
                return None
            on_main_thread[name] = threading.current_thread() is threading.main_thread()
            if name != "open_clip" or not tiny_config:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.add_model_config(tiny_config)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Watch())
    return on_main_thread


class Ticker:
    """A 10 ms QTimer on the GUI thread, recording its ticks (and running ``callbacks``)."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.callbacks: list = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())
        for callback in list(self.callbacks):
            callback()

    def gaps(self, start: float, end: float) -> list[float]:
        """The gaps (ms) whose middle lies in [start, end)."""
        ticks = np.asarray(self.ticks)
        middles = (ticks[:-1] + ticks[1:]) / 2
        gaps = np.diff(ticks)[(middles >= start) & (middles < end)] * 1000
        return gaps.round(1).tolist()


def _wait(condition, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError("timed out")
        QApplication.processEvents()
        time.sleep(0.002)


def _settle(seconds: float) -> None:
    end = time.perf_counter() + seconds
    _wait(lambda: time.perf_counter() > end)


def _python_work(loops: int) -> float:
    """Pure-Python work on the GUI thread (as napari's event handlers do); returns its seconds."""
    start = time.perf_counter()
    total = 0
    for k in range(loops):
        total += k % 7
    return time.perf_counter() - start


def child_import(design: str, on_main_thread: dict) -> dict:
    import gc
    import threading

    import napari

    from napari_sclip.plugin import engine_loader

    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((512, 512), np.uint8))
    _settle(1.0)
    maps = Path("/proc/self/maps")
    llvm_mapped = maps.exists() and "libLLVM" in maps.read_text()
    loops = int(200_000 * 0.010 / _python_work(200_000))  # about 10 ms alone
    alone = float(np.median([_python_work(loops) for _ in range(5)]))
    ticker = Ticker()
    _settle(0.3)
    done: list[float] = []
    work: list[float] = []
    ticker.callbacks.append(lambda: not done and len(ticker.ticks) % 10 == 0 and work.append(_python_work(loops)))

    def engine() -> None:
        import napari_sclip.engine.segmenter  # noqa: F401

    def switch_1ms(load) -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        try:
            load()
        finally:
            sys.setswitchinterval(interval)

    def gc_paused() -> None:
        gc.disable()
        try:
            engine()
        finally:
            gc.enable()

    def promoted_paused() -> None:
        gc.disable()
        try:
            engine()
        finally:
            gc.freeze()
            gc.unfreeze()
            gc.enable()

    def dlopen_no_gil() -> None:
        with engine_loader._torch_libraries_loaded_without_gil():
            engine()

    def full_gc_deferred() -> None:
        with engine_loader._full_collections_deferred():
            engine()

    designs = {
        "thread": engine,
        "switch-1ms": lambda: switch_1ms(engine),
        "gc-paused": gc_paused,
        "gc-paused+promoted": promoted_paused,
        "full-gc-deferred": full_gc_deferred,
        "dlopen-no-gil": dlopen_no_gil,
        "load_engine": engine_loader.load_engine,
        "load_engine+switch-1ms": lambda: switch_1ms(engine_loader.load_engine),
    }

    start = time.perf_counter()
    if design == "gui-thread":
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: (engine(), done.append(time.perf_counter())))
    elif design == "subprocess":
        process = subprocess.Popen([sys.executable, "-c", "import napari_sclip.engine.segmenter"])
        ticker.callbacks.append(lambda: process.poll() is not None and not done and done.append(time.perf_counter()))
    else:
        threading.Thread(target=lambda: (designs[design](), done.append(time.perf_counter())), daemon=True).start()
    _wait(lambda: bool(done))
    _settle(2.0)
    end = time.perf_counter()
    ticker.timer.stop()
    removals = []
    for name in ("first", "second"):  # napari runs a full garbage collection for each
        viewer.add_image(np.zeros((512, 512), np.uint8), name=name)
        _settle(0.3)
        removed = time.perf_counter()
        viewer.layers.remove(name)  # on the GUI thread, as when a user deletes a layer
        removals.append(round((time.perf_counter() - removed) * 1000, 1))
    in_process = design != "subprocess"
    return {
        "design": design,
        "import_s": round(done[0] - start, 3),
        "during_gaps": ticker.gaps(start, done[0]),
        "after_gaps": ticker.gaps(done[0], end),
        "work_slowdown": [round(w / alone, 2) for w in work],
        "removal_ms": removals,
        "gui_thread_imported_torch": on_main_thread.get("torch"),
        "guard": [llvm_mapped, sys.modules.get("triton", 0) is None] if in_process else None,
    }


def child_dlopen(how: str) -> dict:
    import ctypes
    import importlib.util
    import threading

    from napari_sclip.plugin.engine_loader import dlopen_releasing_gil

    torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
    library = os.path.join(torch_dir, "lib", "libtorch.so")
    done: list[float] = []

    def load() -> None:
        if how == "ctypes.CDLL":
            ctypes.CDLL(library, mode=os.RTLD_LOCAL)
        else:
            dlopen_releasing_gil(library)
        done.append(time.perf_counter())

    ticks = [time.perf_counter()]
    start = ticks[0]
    threading.Thread(target=load).start()
    while not done:
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    return {"how": how, "load_s": round(done[0] - start, 3), "longest_ms": round(float(np.diff(ticks).max()) * 1000, 1)}


def child_flow(size: tuple[int, int], click_after: float, on_main_thread: dict) -> dict:
    import napari
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QPlainTextEdit, QPushButton

    from napari_sclip.plugin import runner

    marks: dict[str, float] = {}
    run = ["first"]
    job = runner.run_job

    def timed_job(segmenter, task):
        """The widget's job with marks: engine ready (the job starts), model loaded, returned."""
        marks.setdefault(f"{run[0]} engine ready", time.perf_counter())
        steps = job(segmenter, task)
        step = next(steps)  # "loading <model>"; the model loads before the next step
        while True:
            yield step
            try:
                step = next(steps)
            except StopIteration as stop:
                marks[f"{run[0]} returned"] = time.perf_counter()
                return stop.value
            marks.setdefault(f"{run[0]} model loaded", time.perf_counter())

    runner.run_job = timed_job  # the widget imports it by name when it opens

    viewer = napari.Viewer(show=True)
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    viewer.add_image(image, name="img", rgb=True)
    _settle(1.0)
    ticker = Ticker()
    _settle(0.3)

    marks["open"] = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
    marks["opened"] = time.perf_counter()
    editor = widget.findChild(QPlainTextEdit)
    button = next(b for b in widget.findChildren(QPushButton) if b.text() == "Segment")
    editor.selectAll()
    QTest.keyClicks(editor, "cat")
    for name in ("dog", "grass"):
        QTest.keyClick(editor, Qt.Key.Key_Return)
        QTest.keyClicks(editor, name)
    _settle(max(click_after - (time.perf_counter() - marks["open"]), 0.0))

    def click_and_land(key: str) -> None:
        run[0] = key
        marks[f"{key} click"] = time.perf_counter()
        QTest.mouseClick(button, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(5, 5))
        _wait(lambda: not widget.running and "img labels" in viewer.layers and f"{key} returned" in marks)
        marks[f"{key} landed"] = time.perf_counter()

    click_and_land("first")
    labels = viewer.layers["img labels"].data
    _settle(1.0)
    marks["idle"] = time.perf_counter()
    QTest.keyClick(editor, Qt.Key.Key_Return)
    QTest.keyClicks(editor, "sky")
    click_and_land("rerun")
    _settle(1.0)
    marks["end"] = time.perf_counter()
    ticker.timer.stop()

    phases = {
        name: {"seconds": round(marks[stop] - marks[start], 3), "gaps": ticker.gaps(marks[start], marks[stop])}
        for name, start, stop in zip(PHASES, MARKS, MARKS[1:])
    }
    ticks = np.asarray(ticker.ticks)
    gaps = np.diff(ticks) * 1000
    worst = np.argsort(gaps)[::-1][:5]
    return {
        "size": list(size),
        "labels_shape": list(labels.shape),
        "labels_values": sorted(int(v) for v in np.unique(labels)),
        "on_main_thread": on_main_thread,
        "phases": phases,
        "worst": [(round(float(gaps[i])), round(float(ticks[i] - marks["open"]), 2)) for i in worst],
    }


# -- the parent: fresh processes and a report ----------------------------------------------------


def _fresh(args: list[str], env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child {args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _longest(values: list[float]) -> str:
    return f"{np.median(values):.0f} / {max(values):.0f}"


def _distribution(gaps: list[float]) -> str:
    gaps = np.asarray(gaps)
    return " / ".join(str(int((gaps > low).sum())) for low in (50, 100, 200, 500))


def report_imports(results: dict[str, list[dict]]) -> None:
    runs = len(next(iter(results.values())))
    print(f"\n### Importing the engine while napari shows an image: GIL bursts ({runs} fresh process(es) "
          "per design)\n")
    print("| Design | Import (s), median | Longest stall (ms), median / max | Stalls > 50 / 100 / 200 / 500 ms, "
          "all runs | 10 ms of GUI Python took, median / max | Longest stall in the 2 s after (ms) "
          "| Removing a layer after: first / second (ms, median) |")
    print("|---|---|---|---|---|---|---|")
    for design, runs in results.items():
        longest = [max(run["during_gaps"], default=0.0) for run in runs]
        slowdown = [s for run in runs for s in run["work_slowdown"]] or [np.nan]
        print(f"| {design} | {np.median([run['import_s'] for run in runs]):.2f} | {_longest(longest)} | "
              f"{_distribution([g for run in runs for g in run['during_gaps']])} | "
              f"{np.median(slowdown) * 10:.0f} / {max(slowdown) * 10:.0f} ms | "
              f"{_longest([max(run['after_gaps'], default=0.0) for run in runs])} | "
              f"{np.median([run['removal_ms'][0] for run in runs]):.0f} / "
              f"{np.median([run['removal_ms'][1] for run in runs]):.0f} |")
    guard = sorted({tuple(run["guard"]) for runs in results.values() for run in runs if run["guard"]})
    on_gui = sorted({design for design, runs in results.items() for run in runs if run["gui_thread_imported_torch"]})
    print(f"\nIn-process designs, (Mesa's libLLVM mapped, triton hidden): {guard}; "
          f"torch imported on the GUI thread by: {on_gui}")


def report_dlopen(results: dict[str, list[dict]]) -> None:
    print("\n### Loading libtorch in a thread while the main thread wakes every millisecond\n")
    print("| How | Load (s), median | Longest main-thread stall (ms), median / max |")
    print("|---|---|---|")
    for how, runs in results.items():
        print(f"| {how} | {np.median([run['load_s'] for run in runs]):.2f} | "
              f"{_longest([run['longest_ms'] for run in runs])} |")


def report_flow(runs: list[dict], size: str, click_after: float) -> None:
    height, width = runs[0]["size"]
    print(f"\n### Fresh process, widget flow, {size} RGB ({height} x {width}), click {click_after} s after "
          f"opening, {len(runs)} run(s)\n")
    on_gui = sorted({name for run in runs for name, main in run["on_main_thread"].items() if main})
    print(f"Imported on the GUI thread: {on_gui or 'neither torch nor open_clip'}; labels "
          f"{runs[0]['labels_shape']}, values {runs[0]['labels_values']}\n")
    print("| Phase | Duration (s), median | Longest stall (ms), median / max | Stalls > 50 / 100 / 200 / 500 ms, "
          "all runs |")
    print("|---|---|---|---|")
    for name in PHASES:
        phases = [run["phases"][name] for run in runs]
        print(f"| {name} | {np.median([p['seconds'] for p in phases]):.2f} | "
              f"{_longest([max(p['gaps'], default=0.0) for p in phases])} | "
              f"{_distribution([g for p in phases for g in p['gaps']])} |")
    print("\nLongest stalls of each run (ms @ seconds after opening the widget):")
    for run in runs:
        print("  " + ", ".join(f"{gap} @ {at}" for gap, at in run["worst"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per measurement")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--click-after", type=float, default=1.0,
                        help="seconds from opening the widget to the click (1 s: the import still runs)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dlopen", "import", "flow"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        on_main_thread = _watch_imports(os.environ.get("BENCH_TINY_CONFIG"))
        if args.child[0] == "flow":
            result = child_flow((int(args.child[1]), int(args.child[2])), float(args.child[3]), on_main_thread)
        elif args.child[0] == "dlopen":
            result = child_dlopen(args.child[1])
        else:
            result = child_import(args.child[1], on_main_thread)
        print(json.dumps(result), flush=True)
        os._exit(0)  # skip napari's and torch's teardown

    if not os.environ.get("DISPLAY"):
        raise SystemExit("needs a display: run under xvfb-run (see the docstring)")
    sys.path.insert(0, str(ROOT / "src_tests"))
    import torch

    from conftest import TINY_MODEL, make_tiny_clip, register_tiny_model

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"`python benchmarks/bench_responsiveness.py {' '.join(sys.argv[1:])}`: {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPU(s), load average {load:.1f} at the start, Python {sys.version.split()[0]}, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        register_tiny_model(folder)
        checkpoint = folder / "tiny.pt"
        torch.save(make_tiny_clip().state_dict(), checkpoint)
        env = {
            "BENCH_TINY_CONFIG": str(folder / f"{TINY_MODEL}.json"),
            "NAPARI_SCLIP_MODEL": TINY_MODEL,
            "NAPARI_SCLIP_PRETRAINED": str(checkpoint),
            "NAPARI_SCLIP_DEVICE": "cpu",
            "NAPARI_SCLIP_CACHE_DIR": str(folder / "cache"),
            "HF_HUB_OFFLINE": "1",
        }
        if "dlopen" not in args.skip and sys.platform.startswith("linux"):
            hows = ("ctypes.CDLL", "foreign dlopen")
            loads: dict[str, list[dict]] = {how: [] for how in hows}
            for _ in range(args.runs):
                for how in hows:
                    loads[how].append(_fresh(["--child", "dlopen", how], env))
            report_dlopen(loads)
        if "import" not in args.skip:
            results: dict[str, list[dict]] = {design: [] for design in args.designs}
            for _ in range(args.runs):  # designs alternate, so that they share the machine's moods
                for design in args.designs:
                    results[design].append(_fresh(["--child", "import", design], env))
            report_imports(results)
        if "flow" not in args.skip:
            for size in args.sizes:
                height, width = SIZES[size]
                runs = [_fresh(["--child", "flow", str(height), str(width), str(args.click_after)], env)
                        for _ in range(args.runs)]
                report_flow(runs, size, args.click_after)


if __name__ == "__main__":
    main()
