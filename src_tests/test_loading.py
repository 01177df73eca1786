"""Model loading: tags, local checkpoints in every supported layout, QuickGELU, devices, defaults,
and the errors a user meets on the way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sclip import Segmenter
from napari_sclip.engine import config
from napari_sclip.engine import model as model_module
from napari_sclip.engine import weights as weights_module
from napari_sclip.engine.errors import DeviceError, ModelError
from napari_sclip.engine.model import build_model, load_model, resolve_device
from napari_sclip.engine.weights import WeightsFile, read_state_dict

from conftest import TINY_MODEL, make_tiny_clip, natural_image


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _features(segmenter: Segmenter) -> np.ndarray:
    return segmenter.segment(natural_image(64, 64), ["cat", "dog"], return_probs=True).probs


def test_open_clip_layout_state_dict(tiny_checkpoint):
    clip, quick = build_model(TINY_MODEL, WeightsFile(tiny_checkpoint))
    assert _same_weights(clip, make_tiny_clip())
    assert quick  # the tiny config says quick_gelu
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())


def test_wrapped_and_prefixed_training_checkpoint(tiny_dir):
    state = {f"module.{k}": v for k, v in make_tiny_clip().state_dict().items()}
    path = tiny_dir / "training.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    clip, _ = build_model(TINY_MODEL, WeightsFile(path))
    assert _same_weights(clip, make_tiny_clip())


def test_safetensors(tiny_dir):
    from safetensors.torch import save_file

    path = tiny_dir / "tiny.safetensors"
    state = {k: v.contiguous() for k, v in make_tiny_clip().state_dict().items()}
    save_file(state, str(path))
    clip, _ = build_model(TINY_MODEL, WeightsFile(path))
    assert _same_weights(clip, make_tiny_clip())


def test_quick_gelu_can_be_forced_off_and_changes_the_output(tiny_checkpoint):
    quick = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")
    plain = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", quick_gelu=False)
    assert plain.load().quick_gelu is False and quick.load().quick_gelu is True
    assert np.abs(_features(plain) - _features(quick)).max() > 1e-4


def test_pickled_python_objects_are_never_loaded(tiny_dir):
    path = tiny_dir / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"visual.proj": Payload()}, path)
    with pytest.raises(ModelError, match=r"pickled Python objects \(print\), which are never loaded"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04broken zip"])
def test_corrupt_weights_file(tiny_dir, content):
    path = tiny_dir / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"cannot read weights file .*corrupt\.pt"):
        Segmenter(TINY_MODEL, str(path), "cpu").load()


def test_weights_of_another_model(tiny_dir):
    path = tiny_dir / "mismatch.pt"
    state = make_tiny_clip().state_dict()
    state.pop("visual.proj")
    torch.save(state, path)
    with pytest.raises(ModelError, match="does not fit model sclip-test-tiny: 1 missing, e.g. visual.proj"):
        build_model(TINY_MODEL, WeightsFile(path))


def test_missing_weights_file():
    with pytest.raises(ModelError, match="weights file not found: .*nowhere/ViT-B-16.pt"):
        Segmenter("ViT-B-16", "/nowhere/ViT-B-16.pt", "cpu").load()


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'ViT-Q-99'"):
        Segmenter("ViT-Q-99", "openai", "cpu").load()


def test_unknown_tag():
    with pytest.raises(ModelError, match="unknown pretrained weights 'laion9000' for ViT-B-16 .*openai"):
        Segmenter("ViT-B-16", "laion9000", "cpu").load()


def test_offline_download_says_how_to_work_offline(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise LocalEntryNotFoundError("We couldn't connect to the Hub. Check your connection.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError) as info:
        Segmenter("ViT-B-16", "openai", "cpu").load()
    message = str(info.value)
    assert "could not download the 'openai' weights for ViT-B-16" in message
    assert "NAPARI_SCLIP_PRETRAINED" in message and "pretrained='/path/to/ViT-B-16.pt'" in message
    assert "weights field under Advanced" in message and "--pretrained PATH" in message
    assert "https://openaipublic.azureedge.net/clip/models/" in message  # where to get the file
    assert "We couldn't connect to the Hub)" in message and "\n" not in message
    assert len(calls) == 1  # a network failure does not go on to try other file names


def test_tag_download_goes_to_the_cache_with_progress(monkeypatch, tiny_checkpoint, tmp_path):
    """A tag resolves through open_clip's registry and huggingface_hub, into our cache folder."""
    import huggingface_hub
    import open_clip

    calls = []

    def fake_download(repo_id, filename, cache_dir=None, tqdm_class=None, **kwargs):
        calls.append((repo_id, filename, cache_dir))
        if filename.endswith(".safetensors"):
            raise huggingface_hub.errors.EntryNotFoundError("no safetensors copy")
        bar = tqdm_class(total=300)
        for _ in range(3):
            bar.update(100)
        bar.close()
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        TINY_MODEL,
        {"testtag": {"hf_hub": "someone/tiny-clip/", "quick_gelu": True}},
    )
    events = []
    loaded = load_model(TINY_MODEL, "testtag", "cpu", progress=events.append)
    assert loaded.weights.tag == "testtag" and loaded.quick_gelu
    assert [c[:2] for c in calls] == [
        ("someone/tiny-clip", "open_clip_model.safetensors"),
        ("someone/tiny-clip", "open_clip_pytorch_model.bin"),
    ]
    assert calls[-1][2] == str(tmp_path / "cache" / "models")
    downloads = [(e.done, e.total) for e in events if e.stage == "download"]
    assert downloads == [(0, 0), (100, 300), (200, 300), (300, 300)]


def test_models_are_shared_per_model_weights_and_device(tiny_checkpoint):
    a = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu").load()
    b = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu").load()
    c = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", quick_gelu=False).load()
    assert a is b and a is not c


# -- devices and defaults ------------------------------------------------------------------------


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "unknown device 'tpu'"), ("gpu!", "unknown device"), ("meta", "not supported")],
)
def test_bad_device_names(device, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(device)


def test_unavailable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="device 'cuda:1' was requested"):
        resolve_device("cuda:1")


def test_environment_variables_set_the_defaults(monkeypatch, tiny_checkpoint, tmp_path):
    assert (config.default_model(), config.default_pretrained(), config.default_device()) == (
        "ViT-B-16",
        "openai",
        "auto",
    )
    monkeypatch.setenv("NAPARI_SCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    monkeypatch.setenv("NAPARI_SCLIP_DEVICE", "cpu")
    monkeypatch.setenv("NAPARI_SCLIP_CACHE_DIR", str(tmp_path / "elsewhere"))
    segmenter = Segmenter()
    assert (segmenter.model_name, segmenter.pretrained, segmenter.device_name) == (
        TINY_MODEL,
        str(tiny_checkpoint),
        "cpu",
    )
    segmenter.text_features(["env var name"])
    assert list((tmp_path / "elsewhere" / "text").rglob("*.npy"))
    # Explicit arguments win over the environment.
    assert Segmenter(model="ViT-B-32").model_name == "ViT-B-32"


def test_cache_dir_fallbacks(monkeypatch, tmp_path):
    monkeypatch.delenv("NAPARI_SCLIP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir() == tmp_path / "xdg" / "napari-sclip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.cache_dir() == tmp_path / "home" / ".cache" / "napari-sclip"


def test_weights_identity_changes_with_the_file(tiny_dir):
    path = tiny_dir / "changing.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    before = WeightsFile(path).identity
    torch.save(make_tiny_clip(seed=5).state_dict(), path)
    assert WeightsFile(path).identity != before
    assert WeightsFile(path, tag="openai").identity == "tag:openai"


def test_model_cache_can_be_cleared(tiny_checkpoint):
    a = load_model(TINY_MODEL, str(tiny_checkpoint), "cpu")
    model_module.clear_model_cache()
    assert load_model(TINY_MODEL, str(tiny_checkpoint), "cpu") is not a


def test_weights_module_has_no_hidden_network_default(monkeypatch):
    """A path-like value that does not exist is an error, never a download attempt."""
    monkeypatch.setattr(weights_module, "_download_tag", lambda *a: pytest.fail("tried to download"))
    with pytest.raises(ModelError, match="not found"):
        weights_module.resolve_weights("ViT-B-16", "weights/ViT-B-16.safetensors")
