"""Any plain CLIP ViT (issue 14): tiny random models of patch 14, 16 and 32, with QuickGELU and
GELU, saved in every accepted form (an open_clip name with a checkpoint file or safetensors,
OpenAI's layout, a local-dir folder, a Hugging Face repo or one file in it, a preset) and loaded
through the same code as real weights.  The Hub is a local folder here: nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sclip import Segmenter
from napari_sclip.engine import presets as presets_module
from napari_sclip.engine.errors import ModelError
from napari_sclip.engine.methods import get_method
from napari_sclip.engine.methods.scclip import scclip_layers
from napari_sclip.engine.model import clear_model_cache
from napari_sclip.engine.presets import PRESETS, Preset
from napari_sclip.engine.text import prompt_templates

from conftest import natural_image, random_clip
from reference_methods import method_features_reference
from reference_sclip import text_features_reference

PATCHES = (14, 16, 32)
NAMES = ["cat", "a small dog", "grass"]


def tiny_config(patch: int, quick: bool, layers: int = 3) -> dict:
    return {
        "embed_dim": 32,
        "quick_gelu": quick,
        "vision_cfg": {"image_size": patch * 8, "layers": layers, "width": 64, "head_width": 32, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def registered(tmp_path: Path, name: str, cfg: dict) -> str:
    import open_clip

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def save_safetensors(clip, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def open_clip_folder(folder: Path, cfg: dict, clip, preprocess: dict | None = None) -> Path:
    """A folder in open_clip's local-dir layout: open_clip_config.json and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {"model_cfg": cfg, **({"preprocess_cfg": preprocess} if preprocess else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(document))
    if clip is not None:
        save_safetensors(clip, folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub.hf_hub_download serving ``hub/<org>/<repo>/<file>`` (copied into the cache
    folder, as the real one does); records each request."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = tmp_path / "hub"
    requests = []

    def download(repo_id, filename, cache_dir=None, tqdm_class=None, **kwargs):
        requests.append((repo_id, filename))
        source = hub / repo_id / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        target = Path(cache_dir) / "snapshots" / repo_id / filename
        if not target.is_file():  # cached, as the real one keeps its snapshots, and whole
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{threading.get_ident()}.incomplete")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return hub, requests


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


FORMS = ("name+file", "name+safetensors", "openai-layout", "local-dir", "folder-as-pretrained",
         "hf-hub", "hf-hub-file", "preset")


def _segmenter_for(form: str, patch: int, quick: bool, tmp_path: Path, hub: Path, monkeypatch):
    """(Segmenter, the random model it should load, recorded model, recorded pretrained)."""
    cfg = tiny_config(patch, quick)
    clip = random_clip(cfg, seed=patch)
    label = f"p{patch}-{'quick' if quick else 'gelu'}"
    if form in ("name+file", "name+safetensors", "hf-hub-file"):
        name = registered(tmp_path, f"sclip-test-{label}", cfg)
        if form == "name+file":
            torch.save(clip.state_dict(), tmp_path / "w.pt")
            weights = str(tmp_path / "w.pt")
        elif form == "name+safetensors":
            weights = str(save_safetensors(clip, tmp_path / "w.safetensors"))
        else:
            (hub / "org" / "files" / "ckpt").mkdir(parents=True)
            torch.save(clip.state_dict(), hub / "org" / "files" / "ckpt" / "w.pt")
            weights = "hf-hub:org/files/ckpt/w.pt"
        # A lone state dict cannot tell its activation: say it, as a user would.
        return Segmenter(name, weights, "cpu", quick_gelu=quick), clip, name, weights
    if form == "openai-layout":
        state = {k: v.half() for k, v in clip.state_dict().items()}  # OpenAI's files are fp16
        state.update(input_resolution=torch.tensor(patch * 8), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
        torch.save(state, tmp_path / "openai.pt")
        return Segmenter("ViT-B-16", str(tmp_path / "openai.pt"), "cpu"), None, "ViT-B-16", str(tmp_path / "openai.pt")
    if form in ("local-dir", "folder-as-pretrained"):
        folder = open_clip_folder(tmp_path / label, cfg, clip).resolve()
        if form == "local-dir":
            return Segmenter(f"local-dir:{folder}", None, "cpu"), clip, f"local-dir:{folder}", f"local-dir:{folder}"
        return Segmenter("ViT-B-16", str(folder), "cpu"), clip, f"local-dir:{folder}", f"local-dir:{folder}"
    open_clip_folder(hub / "org" / label, cfg, clip)
    if form == "hf-hub":
        return Segmenter(f"hf-hub:org/{label}", None, "cpu"), clip, f"hf-hub:org/{label}", f"hf-hub:org/{label}"
    monkeypatch.setitem(PRESETS, "tiny", Preset("tiny", "Tiny", "a test model", "general",
                                                 f"hf-hub:org/{label}", None, None, 1))
    return Segmenter("tiny", None, "cpu"), clip, f"hf-hub:org/{label}", f"hf-hub:org/{label}"


@pytest.mark.parametrize("quick", [True, False], ids=["quickgelu", "gelu"])
@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_every_patch_size(form, patch, quick, tmp_path, fake_hub, monkeypatch):
    hub, _ = fake_hub
    if form == "openai-layout" and not quick:
        pytest.skip("OpenAI's weights are QuickGELU by definition")
    segmenter, clip, model_name, pretrained = _segmenter_for(form, patch, quick, tmp_path, hub, monkeypatch)
    loaded = segmenter.load()
    assert loaded.quick_gelu is quick and loaded.patch_size == patch
    if clip is not None:
        assert same_weights(loaded.clip, clip)
    result = segmenter.segment(natural_image(50, 70), NAMES, short_side=patch * 4, window=patch * 3,
                               stride=patch * 2)
    assert result.labels.shape == (50, 70) and set(np.unique(result.labels)) <= {1, 2, 3}
    assert result.params["patch_size"] == patch
    assert (result.params["model"], result.params["pretrained"]) == (model_name, pretrained)


@pytest.mark.parametrize("quick", [True, False], ids=["quickgelu", "gelu"])
@pytest.mark.parametrize("patch", PATCHES)
def test_truncated_text_encoding_equals_full_length(patch, quick, tmp_path):
    folder = open_clip_folder(tmp_path / "m", tiny_config(patch, quick), random_clip(tiny_config(patch, quick)))
    segmenter = Segmenter(f"local-dir:{folder}", None, "cpu")
    loaded = segmenter.load()
    templates = list(prompt_templates())
    names = ["cat", "a very long name of a rare kind of deep-sea fish with lights"]
    ours = segmenter.text_features(names)
    with torch.no_grad():
        expected = text_features_reference(loaded.clip, loaded.tokenizer, names, templates)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_a_hub_repo_is_downloaded_once_config_first(tmp_path, fake_hub):
    hub, requests = fake_hub
    cfg = tiny_config(16, True)
    open_clip_folder(hub / "org" / "m", cfg, None)
    torch.save(random_clip(cfg).state_dict(), hub / "org" / "m" / "open_clip_pytorch_model.bin")
    loaded = Segmenter("hf-hub:org/m", None, "cpu").load()
    # The config, then the weights: the safetensors copy is asked for first, then the .bin.
    assert requests == [("org/m", "open_clip_config.json"), ("org/m", "open_clip_model.safetensors"),
                        ("org/m", "open_clip_pytorch_model.safetensors"), ("org/m", "open_clip_pytorch_model.bin")]
    assert loaded.weights.path.is_relative_to(tmp_path / "cache" / "models")
    assert Segmenter("hf-hub:org/m", None, "cpu").load() is loaded  # one copy per process


def test_a_folders_normalisation_is_used(tmp_path):
    cfg = tiny_config(16, True)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    folder = open_clip_folder(tmp_path / "m", cfg, random_clip(cfg), {"mean": mean, "std": std})
    plain = open_clip_folder(tmp_path / "plain", cfg, random_clip(cfg))
    loaded = Segmenter(f"local-dir:{folder}", None, "cpu").load()
    np.testing.assert_allclose(loaded.source.mean, np.array(mean) * 255)
    np.testing.assert_allclose(loaded.source.std, np.array(std) * 255)
    # OpenAI's mean and std (declared or not) keep the authors' 0-255 constants exactly.
    assert Segmenter(f"local-dir:{plain}", None, "cpu").load().source.mean == (122.771, 116.746, 104.094)
    rgb = natural_image(64, 64)
    a = Segmenter(f"local-dir:{folder}", None, "cpu").segment(rgb, NAMES, return_probs=True).probs
    b = Segmenter(f"local-dir:{plain}", None, "cpu").segment(rgb, NAMES, return_probs=True).probs
    assert np.abs(a - b).max() > 1e-4


BAD_CONFIGS = {
    "timm tower": ({"vision_cfg": {"timm_model_name": "vit_base_patch16_224", "image_size": 224}},
                   "its image tower is a timm model (vit_base_patch16_224)"),
    "ResNet": ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64, "image_size": 224}}, "is a ResNet, not a ViT"),
    "BERT text (BiomedCLIP)": ({"text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                             "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"}},
                               "reads the whole prompt"),
    "non-causal text": ({"text_cfg": {**tiny_config(16, True)["text_cfg"], "no_causal_mask": True}},
                        "text transformer is not causal"),
    "eos pooling": ({"text_cfg": {**tiny_config(16, True)["text_cfg"], "pool_type": "eos", "eos_id": 2,
                                  "hf_tokenizer_name": "facebook/xlm-v-base"}}, "another token than CLIP's end-of-text"),
    "average-pooled ViT": ({"vision_cfg": {**tiny_config(16, True)["vision_cfg"], "pool_type": "avg",
                                           "final_ln_after_pool": True}}, "pools its tokens"),
    # A damaged or hostile config must not make the engine allocate without end.
    "a million blocks": ({"vision_cfg": {**tiny_config(16, True)["vision_cfg"], "layers": 10**6}},
                         "sizes no ViT has"),
    "a trillion parameters": ({"vision_cfg": {**tiny_config(16, True)["vision_cfg"], "layers": 100,
                                              "width": 100_000, "head_width": 100}}, "more than any CLIP"),
    "sizes as text": ({"vision_cfg": {**tiny_config(16, True)["vision_cfg"], "width": "wide"}},
                      "not whole numbers"),
    "zero patch": ({"vision_cfg": {**tiny_config(16, True)["vision_cfg"], "patch_size": 0}}, "sizes no ViT has"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_models_the_engine_cannot_run_get_one_line_before_any_weights(case, tmp_path, fake_hub):
    hub, requests = fake_hub
    change, expected = BAD_CONFIGS[case]
    cfg = {**tiny_config(16, True), **change}
    open_clip_folder(tmp_path / "m", cfg, None)  # no weights at all: the config is refused first
    with pytest.raises(ModelError) as info:
        Segmenter(f"local-dir:{tmp_path / 'm'}", None, "cpu").load()
    assert expected in str(info.value) and "\n" not in str(info.value)
    open_clip_folder(hub / "org" / "bad", cfg, random_clip(tiny_config(16, True)))
    with pytest.raises(ModelError, match="cannot be used"):
        Segmenter("hf-hub:org/bad", None, "cpu").load()
    assert requests == [("org/bad", "open_clip_config.json")]  # the weights were never fetched


@pytest.mark.parametrize("name, expected", [
    ("RN50", "is a ResNet, not a ViT"),
    ("ViT-H-14-CLIPA", "cannot be used"),
    ("ViT-B-16-SigLIP", "timm model"),
    ("coca_ViT-B-32", "cannot be used"),
])
def test_open_clip_names_the_engine_cannot_run(name, expected, tiny_checkpoint):
    with pytest.raises(ModelError, match=expected):
        Segmenter(name, str(tiny_checkpoint), "cpu").load()


def test_source_errors_are_one_line(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    hub, _ = fake_hub
    cases = {
        "local-dir:": "local-dir: needs a folder",
        f"local-dir:{tmp_path / 'missing'}": "not found",
        "hf-hub:justone": "is not a Hugging Face repo",
        "hf-hub:org/../etc": "is not a Hugging Face repo",
        "hf-hub:org/nothing": "has none of open_clip_config.json",
        "hf-hub:org/repo/file.pt": "names one file; give it as pretrained",
    }
    (tmp_path / "empty").mkdir()
    cases[f"local-dir:{tmp_path / 'empty'}"] = "needs open_clip's open_clip_config.json"
    open_clip_folder(tmp_path / "noweights", tiny_config(16, True), None)
    cases[f"local-dir:{tmp_path / 'noweights'}"] = "has no weights file"
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "open_clip_config.json").write_text("{not json")
    cases[f"local-dir:{tmp_path / 'badjson'}"] = "cannot read"
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "open_clip_config.json").write_text('{"model": 1}')
    cases[f"local-dir:{tmp_path / 'nocfg'}"] = "is not an open_clip config"
    for model, expected in cases.items():
        with pytest.raises(ModelError) as info:
            Segmenter(model, None, "cpu").load()
        assert expected in str(info.value) and "\n" not in str(info.value), (model, str(info.value))

    import huggingface_hub

    def gated(repo_id, filename, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, f"Access to model {repo_id} is restricted.")
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelError) as info:
        Segmenter("quiltnet-b16", None, "cpu").load()
    message = str(info.value)
    assert "gated on Hugging Face" in message and "https://huggingface.co/wisdomik/QuiltNet-B-16" in message
    assert "local-dir:" in message and "\n" not in message


def test_offline_hub_says_how_to_work_offline():
    """HF_HUB_OFFLINE is set for every test: the real huggingface_hub refuses at once."""
    with pytest.raises(ModelError) as info:
        Segmenter("bioclip", None, "cpu").load()
    message = str(info.value)
    assert "could not download hf-hub:imageomics/bioclip" in message
    assert "hf download imageomics/bioclip --local-dir FOLDER" in message and "\n" not in message


def test_presets_name_what_they_stand_for():
    import open_clip

    for preset in PRESETS.values():
        assert preset.key == preset.key.lower() and preset.key not in open_clip.list_models()
        if not preset.model.startswith("hf-hub:"):
            assert preset.model in open_clip.list_models()
        with torch.device("meta"):  # the size is the fp32 weights of the architecture
            cfg = open_clip.get_model_config(preset.model) if not preset.model.startswith("hf-hub:") else None
            if cfg is not None:
                parameters = sum(p.numel() for p in open_clip.model.CLIP(**cfg).parameters())
                assert abs(preset.size_mb - parameters * 4 / 1e6) < 1, preset.key
    assert presets_module.find_preset("BioCLIP").model == "hf-hub:imageomics/bioclip"
    assert presets_module.preset_for("ViT-B-16", "openai").key == "openai-b16"
    assert presets_module.preset_for("ViT-B-16", "/some/file.pt") is None


def test_a_preset_with_other_weights_keeps_its_architecture(tmp_path, fake_hub):
    """--model remoteclip-b32 --pretrained FILE: the preset's architecture with the user's file; the
    preset's activation is for its own weights, so the file's own rule applies."""
    cfg = tiny_config(32, False)
    name = registered(tmp_path, "sclip-test-remote", cfg)
    clip = random_clip(cfg)
    torch.save(clip.state_dict(), tmp_path / "mine.pt")
    preset = Preset("tiny-remote", "t", "t", "remote sensing", name, "hf-hub:org/remote/w.pt", False, 1)
    PRESETS[preset.key] = preset
    try:
        with pytest.warns(UserWarning, match="does not say whether it needs QuickGELU"):
            loaded = Segmenter("tiny-remote", str(tmp_path / "mine.pt"), "cpu").load()
        assert same_weights(loaded.clip, clip) and loaded.name == name
    finally:
        del PRESETS[preset.key]
        clear_model_cache()


# -- SC-CLIP on other depths and every method on deep ViTs ---------------------------------------

def test_sc_clip_uses_the_authors_blocks_where_they_publish_them():
    b16, l14 = scclip_layers(12), scclip_layers(24)
    assert (b16.similarity, b16.post, b16.fuse_start, b16.fuse_end, b16.cls_weight) == (8, 3, 3, 10, 0.3)
    assert (l14.similarity, l14.post, l14.fuse_start, l14.fuse_end, l14.cls_weight) == (16, 6, 8, 19, 0.1)
    assert "authors" in b16.rule and "authors" in l14.rule


@pytest.mark.parametrize("depth, expected", [
    (2, (0, 0, 0, 1, 0.3)),
    (3, (1, 1, 1, 2, 0.3)),
    (6, (4, 2, 2, 5, 0.3)),  # 8/2, 3/2 -> 2 (half up), 3/2 -> 2, 10/2
    (18, (12, 5, 5, 15, 0.3)),
    (32, (21, 8, 11, 25, 0.1)),  # 16*4/3 = 21.3, 6*4/3 = 8, 8*4/3 = 10.7, 19*4/3 = 25.3
    (48, (32, 12, 16, 38, 0.1)),
])
def test_sc_clip_scales_the_nearest_published_setting_for_other_depths(depth, expected):
    layers = scclip_layers(depth)
    assert (layers.similarity, layers.post, layers.fuse_start, layers.fuse_end, layers.cls_weight) == expected
    assert layers.rule.startswith("ours")
    assert 0 <= layers.fuse_start < layers.fuse_end <= depth - 1 and max(layers.similarity, layers.post) <= depth - 2


def test_results_record_the_sc_clip_blocks(tmp_path):
    cfg = tiny_config(16, True, layers=6)
    folder = open_clip_folder(tmp_path / "m", cfg, random_clip(cfg))
    result = Segmenter(f"local-dir:{folder}", None, "cpu").segment(natural_image(48, 48), NAMES, method="sc-clip")
    assert result.params["sc_clip_layers"] == {"similarity": 4, "post": 2, "fuse_start": 2, "fuse_end": 5,
                                               "cls_weight": 0.3, "rule": scclip_layers(6).rule}
    assert "sc_clip_layers" not in Segmenter(f"local-dir:{folder}", None, "cpu").segment(
        natural_image(48, 48), NAMES).params


@pytest.fixture(scope="module")
def deep_patch14_visual():
    """A 24-block tiny ViT with 14 px patches: ViT-L/14's depth and patch, narrow."""
    return random_clip(tiny_config(14, True, layers=24), seed=9).visual.eval()


@pytest.mark.parametrize("method", ["sclip", "naclip", "clearclip", "maskclip", "sc-clip"])
def test_every_method_on_a_24_block_vit_matches_the_reference(deep_patch14_visual, method):
    torch.manual_seed(10)
    windows = torch.randn(2, 3, 98, 126)  # 7 x 9 patches of 14 px
    with torch.no_grad():
        ours = get_method(method).features(deep_patch14_visual, windows)
        for i in range(2):
            # SC-CLIP: the authors' ViT-L/14 blocks, written here from their config.
            expected, grid = method_features_reference(deep_patch14_visual, windows[i:i + 1], method,
                                                       sc_clip=(16, 6, 8, 19, 0.1))
            assert ours.shape[1:3] == grid == (7, 9)
            torch.testing.assert_close(ours[i].reshape(-1, ours.shape[-1]), expected, rtol=1e-4, atol=1e-4)


# -- ViT-L/14 at its real size -------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_l14(tmp_path_factory):
    """A randomly initialised ViT-L/14 saved in OpenAI's layout (fp16, with OpenAI's integer
    entries), loaded through the engine as OpenAI's own file would be."""
    import open_clip

    clip = random_clip({**open_clip.get_model_config("ViT-L-14"), "quick_gelu": True}, seed=14)
    state = {k: v.half() for k, v in clip.state_dict().items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path_factory.mktemp("vit-l14") / "ViT-L-14.pt"
    torch.save(state, path)
    del clip, state
    segmenter = Segmenter("ViT-L-14", str(path), "cpu")
    yield segmenter
    clear_model_cache()


def test_vit_l14_loads_as_openais_architecture(vit_l14):
    loaded = vit_l14.load()
    assert (loaded.patch_size, loaded.depth, loaded.quick_gelu) == (14, 24, True)
    assert loaded.clip.visual.transformer.width == 1024 and loaded.clip.visual.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["sclip", "naclip", "clearclip", "maskclip", "sc-clip"])
def test_every_method_on_vit_l14_matches_the_reference(vit_l14, method):
    visual = vit_l14.load().clip.visual
    torch.manual_seed(15)
    window = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = get_method(method).features(visual, window)
        expected, grid = method_features_reference(visual, window, method, sc_clip=(16, 6, 8, 19, 0.1))
    assert ours.shape[1:3] == grid == (16, 16)
    torch.testing.assert_close(ours[0].reshape(-1, ours.shape[-1]), expected, rtol=1e-4, atol=1e-4)


def test_the_vit_l14_pipeline_matches_the_reference(vit_l14):
    """Slide inference on ViT-L/14 (windows of 224 px, 16 x 16 patches) against the plain reference."""
    from reference_sclip import sclip_reference

    rgb = natural_image(120, 150)
    result = vit_l14.segment(rgb, NAMES, return_probs=True, short_side=224)
    text = torch.from_numpy(vit_l14.text_features(NAMES))
    _, _, probs = sclip_reference(vit_l14.load().clip, text, [0, 1, 2], rgb, short_side=224)
    assert result.params["windows"] == 2 and result.params["patch_size"] == 14
    np.testing.assert_allclose(result.probs, probs, atol=2e-3)


# -- sizes and memory, before anything loads -----------------------------------------------------

@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-M-16-alt"])
def test_the_architecture_counts_open_clips_parameters(name):
    import open_clip

    from napari_sclip.engine.memory import Architecture

    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        expected = sum(p.numel() for p in open_clip.model.CLIP(**cfg).parameters())
    arch = Architecture.from_config(cfg)
    # LayerScale adds 2 w per block (ViT-M-16-alt); the estimate leaves it out.
    assert abs(arch.parameters - expected) <= 2 * arch.width * arch.depth


def test_the_memory_estimate_follows_the_image_the_model_and_the_method():
    import open_clip

    from napari_sclip.engine.memory import Architecture, estimate_memory

    b16, l14 = (Architecture.from_config(open_clip.get_model_config(n)) for n in ("ViT-B-16", "ViT-L-14"))
    small = estimate_memory(b16, (448, 640), 8)
    assert small.weights == b16.parameters * 4 and small.total == small.weights + max(small.weights, small.working)
    assert estimate_memory(b16, (4000, 6000), 8).working > small.working  # the outputs grow with the image
    assert estimate_memory(b16, (448, 640), 80).working > small.working  # the canvas with the names
    assert estimate_memory(l14, (448, 640), 8).total > 2.5 * small.total
    assert estimate_memory(b16, (448, 640), 8, method="sc-clip").working > small.working
    assert estimate_memory(b16, (448, 640), 8, batch_size=32, half_precision=True).working > small.working
    assert small.describe() == "up to 1.2 GB (598 MB of weights, twice that while loading; 70 MB for this image)"


def test_sizes_for_menus_never_import_torch(tmp_path):
    import subprocess
    import sys

    folder = open_clip_folder(tmp_path / "m", tiny_config(32, True), None)
    code = ("import sys; from napari_sclip.engine.memory import architecture_of, describe_choice; "
            f"print(describe_choice('bioclip', None, load=False)); "
            f"print(architecture_of('local-dir:{folder}', None, load=False).patch_size); "
            "print(architecture_of('ViT-L-14', None, load=False)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:4] == ["Organisms across the tree of life (TreeOfLife-10M); 598 MB download", "32", "None", "False"]


# -- hostile and odd sources (the attacker's pass) -------------------------------------------------

def _one_line(call) -> str:
    with pytest.raises(ModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def _folder_with(tmp_path, cfg, name="m", weights=True) -> str:
    folder = open_clip_folder(tmp_path / name, cfg, random_clip(tiny_config(16, True)) if weights else None)
    return f"local-dir:{folder}"


@pytest.mark.parametrize("change, expected", [
    ({"width": 1e308}, "sizes no ViT has"),
    ({"width": float("inf")}, "not whole numbers"),
    ({"layers": True}, "not whole numbers"),  # a boolean is not a size
    ({"head_width": "32"}, "not whole numbers"),
    ({"image_size": []}, "not whole numbers"),
    ({"mlp_ratio": float("nan")}, "not whole numbers"),
    ({"patch_size": -16}, "sizes no ViT has"),
])
def test_odd_sizes_are_refused_in_one_line_and_the_note_stays_quiet(tmp_path, change, expected):
    from napari_sclip.engine.memory import architecture_of, describe_choice

    cfg = tiny_config(16, True)
    cfg["vision_cfg"].update(change)
    model = _folder_with(tmp_path, cfg)
    assert expected in _one_line(lambda: Segmenter(model, None, "cpu").load())
    assert architecture_of(model, None, load=False) is None  # the widget's note: no size, no error
    assert describe_choice(model, None, load=False) == "its size is known once its config is read"


def test_odd_config_values_are_refused(tmp_path):
    cfg = {**tiny_config(16, True), "quick_gelu": "no"}  # truthy: it would have built QuickGELU
    assert "quick_gelu is neither true nor false" in _one_line(lambda: Segmenter(_folder_with(tmp_path, cfg), None,
                                                                                 "cpu").load())
    long_text = {**tiny_config(16, True)}
    long_text["text_cfg"] = {**long_text["text_cfg"], "context_length": 30000}  # a 3.6 GB mask
    assert "sizes no ViT has" in _one_line(lambda: Segmenter(_folder_with(tmp_path, long_text, "t"), None,
                                                             "cpu").load())
    nested = {**tiny_config(16, True)}
    deep: dict = {}
    for _ in range(400):
        deep = {"eps": deep}
    nested["vision_cfg"] = {**nested["vision_cfg"], "norm_kwargs": deep}
    assert "nested deeper" in _one_line(lambda: Segmenter(_folder_with(tmp_path, nested, "n"), None, "cpu").load())


def test_a_config_that_does_not_fit_its_weights_allocates_nothing(tmp_path):
    """Shapes are compared with the checkpoint's on torch's meta device before anything is
    allocated; depths no CLIP has (100 000 blocks) are refused before even that."""
    cfg = tiny_config(16, True)
    cfg["vision_cfg"]["layers"] = 100
    assert "missing" in _one_line(lambda: Segmenter(_folder_with(tmp_path, cfg), None, "cpu").load())
    cfg["vision_cfg"]["layers"] = 100_000
    assert "sizes no ViT has" in _one_line(lambda: Segmenter(_folder_with(tmp_path, cfg, "deep"), None,
                                                             "cpu").load())


def test_a_state_dict_in_openais_layout_is_bounded_before_it_is_built(tmp_path):
    """OpenAI's layout builds the model from the checkpoint's shapes: a small file naming
    thousands of blocks, or a huge context, is refused before open_clip builds it."""
    state = {f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.zeros(0) for i in range(1000)}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "blocks.pt")
    assert "no CLIP comes near (1000 image blocks" in _one_line(
        lambda: Segmenter("ViT-B-32", str(tmp_path / "blocks.pt"), "cpu").load())
    long = {"positional_embedding": torch.zeros(20000, 8), "input_resolution": torch.tensor(224)}
    torch.save(long, tmp_path / "context.pt")
    assert "20000-token context" in _one_line(lambda: Segmenter("ViT-B-32", str(tmp_path / "context.pt"),
                                                                "cpu").load())


@pytest.mark.parametrize("tower", ["vision_cfg", "text_cfg"])
@pytest.mark.parametrize("change, expected", [
    ({"norm_kwargs": {"eps": "a"}}, "norm_kwargs are not a LayerNorm's"),
    ({"norm_kwargs": {"eps": -1}}, "norm_kwargs are not a LayerNorm's"),
    ({"act_kwargs": {"approximate": "bogus"}}, "act_kwargs are not GELU's"),
])
def test_layer_keywords_that_would_fail_mid_run_are_refused_at_load(tmp_path, tower, change, expected):
    cfg = tiny_config(16, True)
    cfg[tower] = {**cfg[tower], **change}
    assert expected in _one_line(lambda: Segmenter(_folder_with(tmp_path, cfg), None, "cpu").load())


def test_weights_that_are_not_finite_are_refused(tmp_path):
    cfg = tiny_config(16, True)
    clip = random_clip(cfg)
    with torch.no_grad():
        clip.visual.proj[0, 0] = float("nan")
    folder = open_clip_folder(tmp_path / "nan", cfg, clip)
    assert "not finite numbers (NaN or infinite) in visual.proj" in _one_line(
        lambda: Segmenter(f"local-dir:{folder}", None, "cpu").load())


def test_a_normalisation_no_camera_gives_falls_back_to_openais(tmp_path):
    cfg = tiny_config(16, True)
    for name, mean, std in (("tiny-std", (0.5, 0.5, 0.5), (1e-30, 0.2, 0.2)), ("bools", (True, False, True), (0.2,) * 3)):
        folder = open_clip_folder(tmp_path / name, cfg, random_clip(cfg), {"mean": mean, "std": std})
        assert Segmenter(f"local-dir:{folder}", None, "cpu").load().source.std == (68.501, 66.632, 70.323)


def test_a_fifo_config_is_refused_without_blocking(tmp_path):
    import os

    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "open_clip_config.json")
    assert "not a regular file" in _one_line(lambda: Segmenter(f"local-dir:{folder}", None, "cpu").load())


@pytest.mark.parametrize("kind", ["compressed", "module-twice", "integers", "sparse", "scale-vector"])
def test_hostile_state_dicts_are_refused_in_one_line(tmp_path, kind):
    import zipfile

    cfg = tiny_config(16, True)
    name = registered(tmp_path, "sclip-test-hostile", cfg)
    state = random_clip(cfg).state_dict()
    path = tmp_path / "w.pt"
    if kind == "module-twice":
        state = {**state, **{f"module.{k}": v for k, v in state.items()}}
    elif kind == "integers":
        state = {k: v.long() if k.endswith("proj") else v for k, v in state.items()}
    elif kind == "sparse":
        state = {k: v.to_sparse() if k == "visual.proj" else v for k, v in state.items()}
    elif kind == "scale-vector":
        state = {**state, "logit_scale": torch.ones(5)}
    torch.save(state, path)
    if kind == "compressed":  # the same records, deflated: a small file could unpack to gigabytes
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as target:
            for record in source.infolist():
                target.writestr(record.filename, source.read(record))
        path = tmp_path / "z.pt"
    expected = {"compressed": "compressed records", "module-twice": "some tensors twice",
                "integers": "not dense floating-point", "sparse": "not dense floating-point",
                "scale-vector": "does not fit"}[kind]
    assert expected in _one_line(lambda: Segmenter(name, str(path), "cpu", quick_gelu=True).load())


@pytest.mark.parametrize("model", ["hf-hub:a/b?x=1", "hf-hub:a b/c", "hf-hub:/etc/passwd", "hf-hub:org/re\x00po"])
def test_names_that_are_not_repos(model):
    assert "is not a Hugging Face repo" in _one_line(lambda: Segmenter(model, None, "cpu").load())


def test_paths_no_file_system_takes(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "cannot use folder" in _one_line(lambda: Segmenter(f"local-dir:{loop}", None, "cpu").load())
    assert "cannot use folder" in _one_line(lambda: Segmenter(f"local-dir:{tmp_path}/a\x00b", None, "cpu").load())
    assert "cannot use weights path" in _one_line(lambda: Segmenter("ViT-B-16", "a" * 300 + ".pt", "cpu").load())
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert "is a file, not a folder" in _one_line(lambda: Segmenter(f"local-dir:{weights}", None, "cpu").load())
    assert "cannot use folder" in _one_line(lambda: Segmenter(f"local-dir:{tmp_path}/{'x' * 300}", None,
                                                              "cpu").load())


def test_a_folder_path_object_is_a_model(tmp_path):
    folder = open_clip_folder(tmp_path / "m", tiny_config(16, True), random_clip(tiny_config(16, True)))
    assert Segmenter(f"local-dir:{folder}", None, "cpu").load().patch_size == 16
    assert Segmenter("ViT-B-16", folder, "cpu").load().name == f"local-dir:{folder.resolve()}"


def test_a_repo_or_folder_as_pretrained_says_the_model_is_not_used(tmp_path):
    folder = open_clip_folder(tmp_path / "m", tiny_config(32, True), random_clip(tiny_config(32, True)))
    with pytest.warns(UserWarning, match="brings its own architecture .* the model ViT-L-14 is not used"):
        assert Segmenter("ViT-L-14", str(folder), "cpu").load().patch_size == 32


def test_a_hub_file_offline_says_which_flags_load_it(monkeypatch):
    message = _one_line(lambda: Segmenter("georsclip-b32", None, "cpu").load())
    assert ("hf download Zilun/GeoRSCLIP ckpt/RS5M_ViT-B-32.pt --local-dir FOLDER" in message
            and "--model ViT-B-32 --pretrained FOLDER/ckpt/RS5M_ViT-B-32.pt --quick-gelu" in message)
    assert "--no-quick-gelu" in _one_line(lambda: Segmenter("remoteclip-b32", None, "cpu").load())


def test_downloads_in_threads_leave_the_hub_logger_as_they_found_it(fake_hub):
    import logging
    import threading
    import time

    import huggingface_hub

    hub, _ = fake_hub
    cfg = tiny_config(16, True)
    open_clip_folder(hub / "org" / "m", cfg, random_clip(cfg))
    slow = huggingface_hub.hf_hub_download

    def delayed(*args, **kwargs):
        time.sleep(0.05)
        return slow(*args, **kwargs)

    huggingface_hub.hf_hub_download = delayed
    logger = logging.getLogger("huggingface_hub")
    before = logger.level
    try:
        threads = [threading.Thread(target=lambda: Segmenter("hf-hub:org/m", None, "cpu").load()) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        huggingface_hub.hf_hub_download = slow
    assert logger.level == before
