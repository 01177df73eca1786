"""``napari-sclip evaluate``: scores of methods and sweeps against ground truth, with the tiny
random model (nothing is downloaded).  The metric itself is checked in test_evaluate_metrics.py,
the benchmark layouts in test_evaluate_benchmarks.py; here, that a run scores what the segmenter
really predicts, that a sweep equals separate runs, and the command as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_sclip.engine.vocabulary import parse_vocabulary
from napari_sclip.evaluate.metrics import image_areas
from napari_sclip.evaluate.run import (
    Setting,
    benchmark_truth,
    dataset_truth,
    evaluate,
    folder_truth,
    sweep,
)

from conftest import TINY_MODEL, natural_image
from dataset_helpers import cli_command, run

CLASSES = ["grass, lawn", "sky", "tree", "person"]


def _folder(tmp_path: Path, count: int = 3) -> tuple[Path, Path]:
    """Images and masks (values 0-3, 255 ignore) of different sizes."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        height, width = 60 + 10 * k, 80 - 5 * k
        Image.fromarray(np.roll(natural_image(height, width), 7 * k, axis=1)).save(images / f"im{k}.png")
        mask = rng.integers(0, 4, (height, width)).astype(np.uint8)
        mask[:5] = 255
        Image.fromarray(mask).save(masks / f"im{k}.png")
    return images, masks


def _voc21(root: Path) -> None:
    """A tiny VOC2012 layout: two validation images (palette masks) and one outside the split."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)]
    for k, name in enumerate(["2007_000033", "2007_000042", "2007_000061"]):
        Image.fromarray(np.roll(natural_image(64, 72), 9 * k, axis=1)).save(root / "JPEGImages" / f"{name}.jpg")
        mask = Image.fromarray(np.where(np.arange(72)[None] < 30, 0, 15 + k).repeat(64, 0).astype(np.uint8), "P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")


def test_the_scores_are_those_of_what_the_segmenter_predicts(segmenter, tmp_path):
    images, masks = _folder(tmp_path)
    truth = folder_truth(images, masks, parse_vocabulary(CLASSES))
    setting = Setting("sclip", logit_scale=50.0, prob_threshold=0.3)
    report = evaluate(truth, segmenter, [setting])
    expected = None
    for pair in truth.pairs:
        result = segmenter.segment(np.asarray(Image.open(pair.image)), CLASSES, logit_scale=50.0, prob_threshold=0.3)
        predicted = result.labels.astype(np.int64) - 1
        predicted[result.labels == 0] = 255  # unlabelled: no class
        areas = image_areas(predicted, np.asarray(Image.open(pair.label)), len(CLASSES))
        expected = areas if expected is None else expected + areas
    (only, scores), = report.results
    assert only == setting and report.images == 3 and scores.areas == expected
    assert scores.areas.pred.sum() < scores.areas.label.sum()  # the threshold left pixels unlabelled


def test_a_sweep_gives_the_figures_of_separate_runs(segmenter, tmp_path):
    images, masks = _folder(tmp_path, 2)
    truth = folder_truth(images, masks, parse_vocabulary(CLASSES), background_class=0)
    settings = [Setting("sclip", scale, threshold, area)
                for scale in (None, 65.0) for threshold in (0.0, 0.4) for area in (None, 0.2)]
    settings.append(Setting("maskclip"))
    steps = []
    swept = evaluate(truth, segmenter, settings, progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (4, 4)  # two images, two methods: the model ran once per method
    for setting, scores in swept.results:
        (alone, separate), = evaluate(truth, segmenter, [setting]).results
        assert alone == setting and separate.areas == scores.areas
    figures = {setting: scores.miou for setting, scores in swept.results}
    assert len(set(figures.values())) > 3  # the settings do change the labels
    assert swept.best[1].miou == max(figures.values())


def test_a_mask_value_no_class_has_is_one_line(segmenter, tmp_path):
    from napari_sclip.engine.errors import ImageError

    images, masks = _folder(tmp_path, 1)
    mask = np.asarray(Image.open(masks / "im0.png")).copy()
    mask[10, 10] = 4  # four classes: 0-3, as if numbered from 1 like napari's labels
    Image.fromarray(mask).save(masks / "im0.png")
    with pytest.raises(ImageError, match=r"im0.png holds mask value\(s\) 4, which no class has: masks number the 4 "
                       r"classes from 0 \(255 = ignore\)"):
        evaluate(folder_truth(images, masks, parse_vocabulary(CLASSES)), segmenter, [Setting("sclip")])


def test_a_mask_of_another_size_is_one_line(segmenter, tmp_path):
    from napari_sclip.engine.errors import ImageError

    images, masks = _folder(tmp_path, 1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im0.png")
    with pytest.raises(ImageError, match="im0.png is 10x10 but its image .* is 80x60"):
        evaluate(folder_truth(images, masks, parse_vocabulary(CLASSES)), segmenter, [Setting("sclip")])


def test_a_benchmark_is_scored_with_its_authors_settings(segmenter, tmp_path):
    _voc21(tmp_path / "VOC2012")
    truth = benchmark_truth("voc21", tmp_path / "VOC2012")
    assert [pair.name for pair in truth.pairs] == ["2007_000033", "2007_000042"]
    assert truth.background_class == 0 and truth.class_names[0] == "background" and len(truth.class_names) == 21
    settings = sweep(truth, ["sclip", "clearclip", "naclip"])  # each with its authors' settings
    assert settings == [Setting("sclip", 65.0, 0.1, 0.1), Setting("clearclip", 50.0, 0.5, None),
                        Setting("naclip", 40.0, 0.1, None)]
    assert truth.vocabulary_for("clearclip").classes[0] == ("background",)  # ClearCLIP's own name file
    report = evaluate(truth, segmenter, settings[:2])
    (_, scores), _ = report.results
    assert report.params["sclip"]["short_side"] == 336
    assert (report.params["clearclip"]["short_side"], report.params["clearclip"]["window"]) == (448, 448)
    assert scores.areas.label.sum() == 2 * 64 * 72  # palette indices read, nothing ignored
    assert set(np.flatnonzero(scores.areas.label)) == {0, 15, 16}
    assert scores.areas.pred.sum() == 2 * 64 * 72  # below the threshold is background, never unlabelled


def test_a_datasets_reviewed_samples_are_the_ground_truth(tmp_path):
    from test_review import CLASSES as REVIEW_CLASSES
    from test_review import make_dataset

    from napari_sclip.dataset.paths import DatasetError
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    make_dataset(tmp_path / "ds", 3)
    with pytest.raises(DatasetError, match="no reviewed samples to score against: mark samples reviewed in napari's "
                       r"review panel \(Shift\+R marks one; napari-sclip review .* opens it\)"):
        dataset_truth(tmp_path / "ds")
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.dataset.reader import read_sample

    _, _, train_ids = read_manifest(tmp_path / "ds")
    stored = read_sample(tmp_path / "ds", "train", "s001", train_ids)
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.rewrite("s001", Sample("s001", stored.labels, image=stored.image, confidence=stored.confidence,
                                      meta={**stored.meta, "review_status": "reviewed", "method": "naclip"}))
    truth = dataset_truth(tmp_path / "ds")
    assert [pair.name for pair in truth.pairs] == ["train/s001"]
    # Accepted as the model made it: its labels are the ground truth, which favours that model.
    assert truth.caveat == "1 of the 1 samples are naclip's labels accepted unchanged, which favours naclip"
    assert [names[0] for names in truth.vocabulary.classes] == [names[0] for names in REVIEW_CLASSES.values()]


def _cli(tiny_dir, tiny_checkpoint, *argv):
    return run(cli_command(tiny_dir, tiny_checkpoint, "evaluate", *argv))


def test_the_command_prints_the_table_and_writes_the_report(tiny_dir, tiny_checkpoint, tmp_path):
    images, masks = _folder(tmp_path, 2)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    done = _cli(tiny_dir, tiny_checkpoint, "--images", str(images), "--masks", str(masks), "--classes-file",
                str(classes), "--methods", "sclip,maskclip", "--prob-threshold", "0,0.3", "--json",
                str(tmp_path / "report.json"), "--save-predictions", str(tmp_path / "predicted"),
                "--plot", str(tmp_path / "report.png"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].endswith(": 2 images") and sum(line.startswith("*") for line in lines) == 1
    assert lines[1] == f"model: {TINY_MODEL} ({tiny_checkpoint}), QuickGELU, 16 px patches"  # models compare
    assert "best: " in done.stdout and "mIoU" in done.stdout and "lawn" not in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["results"]) == 4 and sum(result["best"] for result in report["results"]) == 1
    assert set(report["results"][0]["classes"]) == {"grass", "sky", "tree", "person"}
    by_threshold = {result["setting"]["prob_threshold"]: result for result in report["results"][:2]}
    assert by_threshold[0.0]["labelled"] == 1.0 and by_threshold[0.3]["labelled"] < 1.0  # the threshold's trade
    assert by_threshold[0.3]["precise"] != by_threshold[0.0]["precise"]
    assert report["versions"]["torch"] and report["params"]["sclip"]["model"]
    saved = sorted(path.relative_to(tmp_path / "predicted").as_posix() for path in (tmp_path / "predicted").rglob("*.png"))
    assert len(saved) == 8 and "sclip_scale-40_prob-0.3_area-none/im1.png" in saved
    predicted = np.asarray(Image.open(tmp_path / "predicted" / "sclip_scale-40_prob-0.3_area-none" / "im1.png"))
    assert predicted.shape == (70, 75) and set(np.unique(predicted)) <= {0, 1, 2, 3, 255}
    assert Image.open(tmp_path / "report.png").format == "PNG"


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "voc21"], "--benchmark needs --data-root"),
    (["--benchmark", "voc99", "--data-root", "."], "voc99"),
    (["--images", "in"], "--images needs --masks and --classes-file"),
    (["--benchmark", "voc21", "--data-root", "nowhere"], "nowhere"),
    (["--dataset", "nowhere"], "not a napari-sclip dataset"),
])
def test_bad_input_is_one_line(tiny_dir, tiny_checkpoint, tmp_path, argv, message):
    done = run(cli_command(tiny_dir, tiny_checkpoint, "evaluate", *argv), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_unknown_methods_and_bad_lists_are_one_line(tiny_dir, tiny_checkpoint, tmp_path):
    images, masks = _folder(tmp_path, 1)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    base = ["--images", str(images), "--masks", str(masks), "--classes-file", str(classes)]
    for extra, message in ((["--methods", "sclip,magic"], "unknown method 'magic'"),
                           (["--prob-threshold", "0,x"], "--prob-threshold takes a comma-separated list"),
                           (["--prob-threshold", "0,1.5"], "the probability threshold must be between 0 and 1"),
                           (["--logit-scale", "-1"], "a logit scale must be a positive number"),
                           (["--area-threshold", "0.1"], "needs a background class")):
        done = _cli(tiny_dir, tiny_checkpoint, *base, *extra)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_the_plot_draws_each_methods_best_iou_per_class(tmp_path):
    from napari_sclip.evaluate.metrics import Areas, scores
    from napari_sclip.evaluate.plot import plot_report
    from napari_sclip.evaluate.run import Report

    def made(ious):  # areas giving these IoUs: intersect / union with union 100
        intersect = np.array([round(100 * iou) for iou in ious])
        return scores(Areas(intersect, np.full(3, 100), intersect, np.full(3, 100)), ["cat", "dog", "a long class"])

    report = Report("synthetic", 2, (
        (Setting("sclip", prob_threshold=0.0), made([0.5, 0.2, 0.0])),
        (Setting("sclip", prob_threshold=0.1), made([1.0, 0.6, 0.3])),  # sclip's best
        (Setting("maskclip"), made([0.25, 0.0, 0.0])),
    ), {})
    plot_report(report, tmp_path / "plot.png")
    image = np.asarray(Image.open(tmp_path / "plot.png").convert("RGB"))
    blue, orange = np.all(image == (31, 119, 180), axis=-1), np.all(image == (255, 127, 14), axis=-1)
    bars = np.s_[40:341]  # the chart's rows: 300 px for 100 %
    heights = [blue[bars, x].sum() for x in np.flatnonzero(blue[bars].any(0))]
    assert sorted(set(heights)) == [91, 181, 301]  # 30 %, 60 %, 100 % of 300 px, plus the axis row
    assert sorted(set(orange[bars, x].sum() for x in np.flatnonzero(orange[bars].any(0)))) == [1, 76]  # 25 %, and 0 % as a line


def test_an_interrupted_evaluation_goes_on_where_it_stopped(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from napari_sclip.cli import main
    from napari_sclip.evaluate import run as run_module

    images, masks = _folder(tmp_path, 4)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    argv = ["evaluate", "--images", str(images), "--masks", str(masks), "--classes-file", str(classes),
            "--prob-threshold", "0,0.3", "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--device", "cpu", "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "whole.json")]) == 0
    real, scored = run_module._score_image, []

    def interrupted(segmenter, run, method, image, canvas):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(image.tag.name)
        return real(segmenter, run, method, image, canvas)

    monkeypatch.setattr(run_module, "_score_image", interrupted)
    capsys.readouterr()
    assert main([*argv, "--json", str(tmp_path / "resumed.json")]) == 130
    assert capsys.readouterr().err == "napari-sclip: interrupted; run the same command to go on\n"
    assert scored == ["im0", "im1"] and not (tmp_path / "resumed.json").exists()
    monkeypatch.setattr(run_module, "_score_image", lambda *args: scored.append(args[3].tag.name) or real(*args))
    assert main([*argv, "--json", str(tmp_path / "resumed.json")]) == 0
    assert scored == ["im0", "im1", "im2", "im3"]  # the first two were not scored again
    whole, resumed = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "resumed.json"))
    assert resumed["results"] == whole["results"]
    assert not list((tmp_path / "cache" / "evaluate").glob("*.json"))  # done: nothing left to resume


@pytest.mark.cluster
def test_a_dask_cluster_gives_the_figures_of_one_process(tiny_dir, tiny_checkpoint, tmp_path):
    images, masks = _folder(tmp_path, 3)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    base = ["--images", str(images), "--masks", str(masks), "--classes-file", str(classes), "--prob-threshold", "0,0.3"]
    here = _cli(tiny_dir, tiny_checkpoint, *base, "--json", str(tmp_path / "here.json"))
    assert here.returncode == 0, here.stderr
    there = _cli(tiny_dir, tiny_checkpoint, *base, "--workers", "2", "--json", str(tmp_path / "there.json"))
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout
    results = [json.loads((tmp_path / name).read_text())["results"] for name in ("here.json", "there.json")]
    assert results[0] == results[1]


@pytest.mark.parametrize("name", ["voc21", "context60", "coco-object", "voc20", "cityscapes", "context59", "ade20k",
                                  "coco-stuff"])
def test_each_benchmark_layout_is_scored(segmenter, tmp_path, name):
    from test_evaluate_benchmarks import make_layout, write_grey, write_palette

    from napari_sclip.evaluate.benchmarks import BENCHMARKS
    from napari_sclip.evaluate.metrics import reduce_zero_label

    benchmark = BENCHMARKS[name]
    make_layout(tmp_path, benchmark)
    rng = np.random.default_rng(1)
    expected = 0
    for k, pair in enumerate(benchmark.pairs(tmp_path)):  # images a model can see, labels to match
        Image.fromarray(np.roll(natural_image(40, 56), 5 * k, axis=1)).save(pair.image, "JPEG" if pair.image.suffix
                                                                           == ".jpg" else "PNG")
        values = rng.integers(0, benchmark.num_classes, (40, 56)).astype(np.uint8)
        values[:3] = 255
        (write_palette if benchmark.labels == "SegmentationClass" else write_grey)(pair.label, values)
        scored = reduce_zero_label(values) if benchmark.reduce_zero_label else values
        expected += int(((scored != 255) & (scored < benchmark.num_classes)).sum())
    truth = benchmark_truth(name, tmp_path)
    report = evaluate(truth, segmenter, sweep(truth, ["sclip"]))
    (setting, scores), = report.results
    assert report.images == len(truth.pairs) >= 2 and scores.areas.label.sum() == expected
    assert (setting.logit_scale, setting.prob_threshold) == (benchmark.logit_scale, benchmark.prob_threshold)
    assert report.params["sclip"]["short_side"] == benchmark.short_side


def test_outputs_that_cannot_be_written_are_refused_before_scoring(tiny_dir, tiny_checkpoint, tmp_path):
    images, masks = _folder(tmp_path, 1)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    base = ["--images", str(images), "--masks", str(masks), "--classes-file", str(classes)]
    (tmp_path / "folder.json").mkdir()
    for extra, message in (
        (["--json", str(tmp_path / "nowhere" / "r.json")], f"the folder {tmp_path / 'nowhere'} does not exist"),
        (["--json", str(tmp_path / "folder.json")], "is a folder: give a file name"),
        (["--plot", str(tmp_path / "r.pdf")], "--plot writes a PNG: give a file name ending in .png, not 'r.pdf'"),
        (["--save-predictions", str(images / "predicted")], "overlaps the images or masks"),
        (["--data-root", str(tmp_path)], "--data-root is for --benchmark"),
        (["--background-class", "4"], "the background class must be one of the 4 classes (0 to 3), got 4"),
    ):
        done = _cli(tiny_dir, tiny_checkpoint, *base, *extra)
        assert done.returncode == 1 and done.stdout == "", (extra, done.stdout)  # nothing was scored
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_a_damaged_or_outdated_checkpoint_is_not_used(tiny_checkpoint, tmp_path, monkeypatch):
    from napari_sclip.cli import main
    from napari_sclip.evaluate import run as run_module

    from conftest import TINY_MODEL

    images, masks = _folder(tmp_path, 3)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    argv = ["evaluate", "--images", str(images), "--masks", str(masks), "--classes-file", str(classes),
            "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())["results"]
    real = run_module._score_image
    for damage in ("shorter counts", "a setting less", "floats", "changed masks"):
        scored = []

        def interrupted(*args, scored=scored):
            if len(scored) == 1:
                raise KeyboardInterrupt
            scored.append(1)
            return real(*args)

        monkeypatch.setattr(run_module, "_score_image", interrupted)
        assert main(argv) == 130
        monkeypatch.setattr(run_module, "_score_image", real)
        path, = (tmp_path / "cache" / "evaluate").glob("*.json")
        saved = json.loads(path.read_text())
        counts = saved["tally"]["areas"][0][1]
        if damage == "shorter counts":
            counts["union"] = counts["union"][:2]
        elif damage == "a setting less":
            saved["tally"]["areas"] = []
        elif damage == "floats":
            counts["intersect"] = [n + 0.5 for n in counts["intersect"]]
        else:  # the ground truth changed since: another run
            mask = np.asarray(Image.open(masks / "im0.png")).copy()
            mask[5:] = 1
            Image.fromarray(mask).save(masks / "im0.png")
        path.write_text(json.dumps(saved))
        assert main([*argv, "--json", str(tmp_path / "again.json")]) == 0  # afresh, no crash
        if damage != "changed masks":
            assert json.loads((tmp_path / "again.json").read_text())["results"] == whole
        for leftover in (tmp_path / "cache" / "evaluate").glob("*.json"):
            leftover.unlink()
    fresh = main([*argv, "--json", str(tmp_path / "fresh.json")])
    assert fresh == 0 and json.loads((tmp_path / "fresh.json").read_text())["results"] == json.loads(
        (tmp_path / "again.json").read_text())["results"]  # the changed masks were scored afresh


def test_a_dask_task_carries_its_own_images_only(segmenter, tmp_path, monkeypatch):
    import pickle

    from napari_sclip.dataset import cluster
    from napari_sclip.evaluate import run as run_module

    images, masks = _folder(tmp_path, 5)
    truth = folder_truth(images, masks, parse_vocabulary(CLASSES))
    sent = []

    def fake_map(client, function, items, **options):  # the tasks, run here
        for index, chunk in enumerate(items):
            sent.append(len(pickle.dumps(chunk)))
            assert chunk.run.truth.pairs == () and len(chunk.pairs) <= 2
            with monkeypatch.context() as local:
                local.setattr(cluster, "using_worker_segmenter", lambda: __import__("contextlib").nullcontext(segmenter))
                yield index, function(chunk)

    class Client:
        def nthreads(self):
            return {"a": 1}

    monkeypatch.setattr(cluster, "install_segmenter", lambda *args, **kwargs: None)
    monkeypatch.setattr(cluster, "map_bounded", fake_map)
    steps = run_module.iter_evaluate(truth, segmenter, [Setting("sclip")], client=Client(), chunk_size=2)
    report = None
    while report is None:
        try:
            next(steps)
        except StopIteration as finished:
            report = finished.value
    assert len(sent) == 3 and max(sent) - min(sent) < 200  # no chunk grows with the set
    (_, scores), = report.results
    (_, here), = evaluate(truth, segmenter, [Setting("sclip")]).results
    assert scores.areas == here.areas


def test_checkpoints_of_runs_abandoned_a_month_ago_are_deleted(tmp_path):
    import os
    import time

    from napari_sclip.evaluate.run import Checkpoint, Tally

    folder = tmp_path / "evaluate"
    folder.mkdir()
    old, recent = folder / "old.json", folder / "recent.json"
    for path, age in ((old, 31), (recent, 29)):
        path.write_text("{}")
        os.utime(path, (time.time() - age * 86400,) * 2)
    Checkpoint(folder / "mine.json", "x").save(Tally.empty([Setting("sclip")], 3), now=True)
    assert sorted(path.name for path in folder.iterdir()) == ["mine.json", "recent.json"]
