"""Checkpoints never execute code: TorchScript archives are read without TorchScript, hostile and
malformed archives are refused in one line, and OpenAI's kind of archive loads exactly.

Hand-made archives follow TorchScript's layout (``test_hand_made_archives_are_real_torchscript``
checks that ``torch.jit.load`` accepts them), so each hostile variant differs from a valid
archive in one field.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_sclip import Segmenter
from napari_sclip.engine.errors import ActivationWarning, ModelError
from napari_sclip.engine.model import build_model
from napari_sclip.engine.torchscript import read_torchscript
from napari_sclip.engine.weights import WeightsFile, read_state_dict

from conftest import TINY_CONFIG, TINY_DEEP_MODEL, TINY_MODEL, make_tiny_clip, natural_image

#: What every refusal of an archive ends with: what to do instead.
ARCHIVE_ADVICE = "pass OpenAI's original file or a state dict saved with torch.save or as .safetensors"


def _one_line_error(info: pytest.ExceptionInfo, path: Path, ending: str) -> str:
    message = str(info.value)
    assert "\n" not in message and str(path) in message and message.endswith(ending), message
    return message


# -- a hostile archive: TorchScript that writes a file while torch.jit.load unpickles it -----------


class Hostile(torch.nn.Module):
    """A module whose ``__setstate__`` (run by ``torch.jit.load``) writes ``!!!!!!!!`` into a file."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.target = target
        self.marker = torch.zeros(8, dtype=torch.uint8)

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, torch.Tensor, bool]:
        return (self.weight, self.target, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.target = state[1]
        self.training = state[3]
        # Kept in an attribute, or the compiler drops the write as dead code.
        self.marker = torch.from_file(state[1], shared=True, size=8, dtype=torch.uint8).fill_(33)


class Carrier(torch.nn.Module):
    """A plain module with the hostile one inside."""

    def __init__(self, target: str):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.inner = Hostile(target)

    def forward(self, x):
        return self.inner(self.proj(x))


def _save_script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated"
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(b"untouched\n")
    return path


@pytest.fixture(params=["top-level", "nested"])
def hostile_archive(request, tmp_path, victim) -> Path:
    module = Hostile(str(victim)) if request.param == "top-level" else Carrier(str(victim))
    return _save_script(module, tmp_path / "hostile.pt")


def test_the_hostile_archive_does_write_under_torch_jit_load(hostile_archive, victim):
    """The attack is real (so the tests below can fail): torch.jit.load writes the file, and
    creates it where it is missing."""
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(hostile_archive))
        assert victim.read_bytes().startswith(b"!!!!!!!!")
        victim.unlink()


def test_our_loader_refuses_the_hostile_archive_and_runs_nothing(hostile_archive, victim):
    with pytest.raises(ModelError) as info:
        Segmenter("ViT-B-16", str(hostile_archive), "cpu").load()
    message = _one_line_error(info, hostile_archive, ARCHIVE_ADVICE)
    assert "restores itself with TorchScript code (__setstate__), which is never run" in message
    assert victim.read_bytes() == b"untouched\n"


def _cli_segment(tmp_path: Path, weights: Path) -> subprocess.CompletedProcess:
    """``napari-sclip segment`` of a photo with ViT-B-16 and ``weights``, in a fresh interpreter."""
    image = tmp_path / "photo.png"
    Image.fromarray(natural_image(64, 64)).save(image)
    return subprocess.run(
        [sys.executable, "-m", "napari_sclip.cli", "segment", str(image), "--classes", "a; b",
         "--out", str(tmp_path / "out"), "--model", "ViT-B-16", "--pretrained", str(weights),
         "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )


def test_the_cli_refuses_the_hostile_archive_in_one_line(hostile_archive, victim, tmp_path):
    run = _cli_segment(tmp_path, hostile_archive)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-sclip: error: cannot read weights file"), run.stderr
    assert lines[0].endswith(ARCHIVE_ADVICE)
    assert victim.read_bytes() == b"untouched\n"


# -- OpenAI's weights: the released TorchScript archive and state dicts in its layout ----------------


def _openai_style_clip():
    """A tiny CLIP with OpenAI's head width (64), as OpenAI's checkpoints imply."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(7)
    vision = CLIPVisionCfg(layers=2, width=128, patch_size=16, image_size=224)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    return CLIP(32, vision, text, quick_gelu=True).eval()


def test_openai_torchscript_archive_builds_openais_architecture(tiny_dir):
    """OpenAI's released .pt files are TorchScript archives; they must give QuickGELU."""
    reference = _openai_style_clip()
    path = tiny_dir / "ViT-tiny-openai.pt"
    with pytest.warns(FutureWarning):
        torch.jit.script(reference).save(str(path))
    state, openai_layout = read_state_dict(path)
    assert openai_layout and "attn_mask" not in state
    # The model name only picks the tokenizer: the architecture comes from the weights.
    clip, quick = build_model("ViT-B-16", WeightsFile(path))
    assert quick
    assert type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert clip.visual.transformer.width == 128
    _assert_same_tensors(clip.state_dict(), reference.state_dict())


def test_openai_layout_state_dict_with_its_integer_entries(tiny_dir):
    state = dict(_openai_style_clip().state_dict())
    state.pop("attn_mask", None)
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tiny_dir / "openai-dict.pt"
    torch.save(state, path)
    clip, quick = build_model("ViT-B-16", WeightsFile(path))
    assert quick
    _assert_same_tensors(clip.state_dict(), _openai_style_clip().state_dict())


def _openai_archive(path: Path, traced: bool) -> Path:
    """A tiny CLIP in OpenAI's layout saved as OpenAI did: traced in fp16 with its integer buffers
    (``input_resolution``, ...), or scripted in fp32."""
    clip = _openai_style_clip()
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        clip.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        clip.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        if traced:
            clip = clip.half()
            inputs = {"encode_image": torch.zeros(1, 3, 224, 224, dtype=torch.half),
                      "encode_text": torch.zeros(1, 77, dtype=torch.long)}
            torch.jit.trace_module(clip, inputs, check_trace=False).save(str(path))
        else:
            torch.jit.script(clip).save(str(path))
    return path


def _jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        mine = ours[key]
        assert (mine.dtype, mine.shape, mine.stride(), mine.storage_offset()) == (
            tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset()), key
        assert torch.equal(mine, tensor.detach()), key


@pytest.mark.parametrize("traced", [True, False], ids=["traced-fp16", "scripted-fp32"])
def test_openai_kind_of_archive_gives_exactly_torch_jit_loads_tensors(tmp_path, traced):
    path = _openai_archive(tmp_path / "ViT-tiny.pt", traced)
    reference = _jit_state_dict(path)
    assert "visual.conv1.weight" in reference and "input_resolution" in reference
    _assert_same_tensors(read_torchscript(path), reference)


def test_storages_saved_from_a_gpu_load_on_the_cpu(tmp_path):
    """OpenAI traced on a GPU: their storages say ``cuda:0``."""
    path = _openai_archive(tmp_path / "ViT-tiny.pt", traced=True)
    gpu = tmp_path / "ViT-tiny-gpu.pt"
    _rewrite(path, gpu, {"ViT-tiny/data.pkl": lambda data: data.replace(_s("cpu"), _s("cuda:0"))})
    assert _s("cuda:0") in zipfile.ZipFile(gpu).read("ViT-tiny/data.pkl")
    _assert_same_tensors(read_torchscript(gpu), _jit_state_dict(path))


def test_segmenter_results_are_those_of_torch_jit_loads_weights(tmp_path):
    """Labels and probabilities from the archive equal those from the same tensors taken out by
    torch.jit.load (the old reader) and saved as a state dict."""
    archive = _openai_archive(tmp_path / "ViT-tiny.pt", traced=True)
    state_dict = tmp_path / "ViT-tiny-state.pt"
    torch.save(_jit_state_dict(archive), state_dict)
    image = natural_image(100, 120)
    results = []
    for path in (archive, state_dict):
        segmenter = Segmenter("ViT-B-16", str(path), "cpu")
        results.append(segmenter.segment(image, ["person", "sky", "rocket"], return_probs=True))
        assert segmenter.load().quick_gelu
    np.testing.assert_array_equal(results[0].labels, results[1].labels)
    np.testing.assert_array_equal(results[0].probs, results[1].probs)


# -- hand-made archives: valid, then hostile or broken in one field -----------------------------------


def _s(text: str) -> bytes:
    """Pickle opcode BINUNICODE."""
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _tensor(key="0", numel=6, size=(2, 3), stride=(3, 1), offset=0, storage="FloatStorage") -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` as TorchScript
    pickles it, with the storage as a persistent id."""
    pid = _tuple([_s("storage"), f"ctorch\n{storage}\n".encode(), _s(key), _s("cpu"), _int(numel)])
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + _int(offset)
            + _tuple([_int(n) for n in size]) + _tuple([_int(n) for n in stride])
            + b"\x89ccollections\nOrderedDict\n)R" + b"tR")


def _module(name: str, attributes: dict[str, bytes]) -> bytes:
    """An object of class ``__torch__.<name>``: NEWOBJ, then BUILD with its attribute dict."""
    items = b"".join(_s(key) + value for key, value in attributes.items())
    return f"c__torch__\n{name}\n".encode() + b")\x81}(" + items + b"ub"


_CODE = """class Outer(Module):
  __parameters__ = ["weight", ]
  __buffers__ = ["scale", ]
  weight : Tensor
  scale : Tensor
  training : bool
  inner : __torch__.Inner
  def forward(self: __torch__.Outer, x: Tensor) -> Tensor:
    return torch.matmul(self.weight, x)
class Inner(Module):
  __parameters__ = ["weight", ]
  __buffers__ = []
  weight : Tensor
  training : bool
  def forward(self: __torch__.Inner, x: Tensor) -> Tensor:
    return x
"""
_STORAGE = np.arange(6, dtype="<f4").tobytes()


def _outer(weight: bytes | None = None, inner_weight: bytes | None = None) -> bytes:
    """data.pkl of Outer(weight 2x3, scale, Inner(weight: every other element, offset 1))."""
    inner = _module("Inner", {"weight": inner_weight or _tensor(numel=6, size=(3,), stride=(2,), offset=1),
                              "training": b"\x89"})
    return b"\x80\x02" + _module("Outer", {
        "weight": weight or _tensor(), "scale": _tensor(size=(), stride=(), offset=5),
        "training": b"\x88", "inner": inner,
    }) + b"."


def _write_archive(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None,
                   storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {
            "archive/data.pkl": data_pkl,
            "archive/code/__torch__.py": _CODE.encode(),
            "archive/constants.pkl": pickle.dumps((), protocol=2),
            "archive/version": b"3",
            **{f"archive/data/{key}": data for key, data in (storages or {"0": _STORAGE}).items()},
            **(records or {}),
        }.items():
            archive.writestr(name, data)
    return path


def _rewrite(source: Path, target: Path, change: dict) -> Path:
    """A copy of an archive with some records changed (a function of their bytes)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, change[info.filename](data) if info.filename in change else data)
    return target


def test_hand_made_archives_are_real_torchscript(tmp_path):
    path = _write_archive(tmp_path / "valid.pt", _outer())
    reference = _jit_state_dict(path)
    assert list(reference) == ["weight", "scale", "inner.weight"]
    assert reference["inner.weight"].tolist() == [1.0, 3.0, 5.0] and reference["scale"].item() == 5.0
    _assert_same_tensors(read_torchscript(path), reference)


def _call(module: str, name: str, argument: str) -> bytes:
    """data.pkl that calls ``module.name(argument)``: what a pickle exploit looks like."""
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + _s(argument) + b"\x85R."


class _Payload:
    def __init__(self, action, argument):
        self.action, self.argument = action, argument

    def __reduce__(self):
        return self.action, (self.argument,)


@pytest.mark.parametrize(
    "make_pickle, reason",
    [
        (lambda m: _call("os", "system", f"touch {m}"), "its data.pkl asks for os.system, which a checkpoint never needs"),
        (lambda m: _call("builtins", "eval", f"open({str(m)!r}, 'w')"), "asks for builtins.eval"),
        (lambda m: _call("builtins", "exec", f"open({str(m)!r}, 'w')"), "asks for builtins.exec"),
        (lambda m: pickle.dumps(_Payload(os.makedirs, str(m)), protocol=2), "asks for os.makedirs"),
        (lambda m: pickle.dumps(_Payload(open, str(m)), protocol=4), "asks for io.open"),
        # STACK_GLOBAL takes any text as a name: it is never echoed as it is.
        (lambda m: b"\x80\x04" + _s("os\nevil") + _s("system") + b"\x93" + _s(str(m)) + b"\x85R.",
         "asks for <unprintable name>, which"),
        (lambda m: _outer(weight=_tensor(storage="PyObjectStorage")), "asks for torch.PyObjectStorage"),
        (lambda m: _outer(weight=b"ctorch._utils\n_rebuild_parameter\n)R"), "asks for torch._utils._rebuild_parameter"),
        # The stand-in of a TorchScript class is inert: calling it is refused too.
        (lambda m: b"\x80\x02c__torch__\nOuter\n" + _s(str(m)) + b"\x85R.", "its data.pkl is damaged (TypeError)"),
    ],
    ids=["os.system", "eval", "exec", "reduce-to-method", "reduce-protocol-4", "odd-name", "storage-type",
         "rebuild-parameter", "call-stand-in"],
)
def test_pickles_that_ask_for_code_are_refused(tmp_path, make_pickle, reason):
    marker = tmp_path / "marker"
    path = _write_archive(tmp_path / "evil.pt", make_pickle(marker))
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert reason in _one_line_error(info, path, ARCHIVE_ADVICE)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data_pkl, storages, reason",
    [
        (_outer(weight=_tensor(key="../../../etc/passwd")), None, "describes a tensor storage in a way PyTorch never does"),
        (_outer(weight=_tensor(key="7")), None, "it has no record data/7 for a storage its data.pkl uses"),
        (_outer(), {"0": _STORAGE[:-4]}, "its storage data/0 holds 20 bytes where its data.pkl declares 24"),
        (_outer(inner_weight=_tensor(numel=7, size=(3,), stride=(2,))), None, "gives storage 0 two different types or sizes"),
        (_outer(weight=_tensor(size=(3, 3))), None, "places a tensor beyond the end of its storage"),
        (_outer(weight=_tensor(size=(2, 3), stride=(3, 1), offset=1)), None, "places a tensor beyond the end"),
        (_outer(weight=_tensor(size=(-1,), stride=(1,))), None, "gives a tensor an impossible size"),
        (_outer(weight=_tensor(storage="DoubleStorage")), None, "holds 24 bytes where its data.pkl declares 48"),
        (_outer(weight=_s("not a tensor")), None, "weight in its data.pkl is not a tensor"),
        (_outer()[:-9], None, "its data.pkl is damaged (UnpicklingError)"),
        (b"\x80\x02" + _tensor() + b".", None, "its data.pkl does not hold a TorchScript module"),
        (b"\x80\x02" + _module("Missing", {"training": b"\x88"}) + b".", None, "does not hold a TorchScript module"),
        # A module whose state holds the module itself.
        (b"\x80\x02c__torch__\nInner\n)\x81q\x00}(" + _s("inner") + b"h\x00ub.", None, "appears twice"),
    ],
    ids=["key-path", "missing-storage", "truncated-storage", "storage-reused", "size-too-big", "offset-too-big",
         "negative-size", "wrong-dtype-size", "not-a-tensor", "truncated-pickle", "not-a-module", "unknown-class",
         "cycle"],
)
def test_malformed_archives_are_refused_in_one_sentence(tmp_path, data_pkl, storages, reason):
    path = _write_archive(tmp_path / "bad.pt", data_pkl, storages=storages)
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert reason in _one_line_error(info, path, ARCHIVE_ADVICE)


@pytest.mark.parametrize(
    "records, reason",
    [
        ({"../../outside/code/x.py": b""}, "holds a record named ../../outside/code/x.py"),
        ({"/etc/code/passwd": b""}, "holds a record named /etc/code/passwd"),
        ({"archive/code/..\\..\\x.py": b""}, "holds a record named <unprintable name>, which"),
        ({"other/data.pkl": _outer()}, "does not have exactly one data.pkl record"),
    ],
    ids=["dot-dot", "absolute", "backslash", "two-data-pkl"],
)
def test_zip_path_tricks_are_refused(tmp_path, records, reason):
    path = _write_archive(tmp_path / "tricks.pt", _outer(), records=records)
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert reason in _one_line_error(info, path, ARCHIVE_ADVICE)


def test_duplicate_and_compressed_records_are_refused(tmp_path):
    path = _write_archive(tmp_path / "dup.pt", _outer())
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as archive:
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        archive.writestr("archive/data/0", np.zeros(6, "<f4").tobytes())
    with pytest.raises(ModelError, match="two records under one name"):
        read_state_dict(path)

    plain = _write_archive(tmp_path / "plain.pt", _outer())
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
    with pytest.raises(ModelError, match="storage data/0 is compressed, which PyTorch never does"):
        read_state_dict(deflated)


def test_module_state_set_by_code_is_refused_even_when_benign(tmp_path):
    """A module class with its own ``__setstate__``: only its code knows what its state means."""
    code = _CODE.replace("    return x\n", "    return x\n  def __setstate__(self: __torch__.Inner, state: bool) -> None:\n"
                                            "    self.training = state\n")
    path = _write_archive(tmp_path / "setstate.pt", _outer(), records={"archive/code/__torch__.py": code.encode()})
    with pytest.raises(ModelError, match="module inner restores itself with TorchScript code"):
        read_state_dict(path)


def test_big_endian_storages_are_decoded(tmp_path):
    path = _write_archive(tmp_path / "big.pt", _outer(), storages={"0": np.arange(6, dtype=">f4").tobytes()},
                          records={"archive/byteorder": b"big"})
    state = read_torchscript(path)
    assert state["weight"].tolist() == [[0, 1, 2], [3, 4, 5]] and state["inner.weight"].tolist() == [1, 3, 5]


@pytest.mark.parametrize("allowed", ["torch\nFloatStorage", "collections\nOrderedDict",
                                     "torch._utils\n_rebuild_tensor_v2", "torch.jit._pickle\nbuild_intlist"])
def test_what_a_pickle_may_ask_for_cannot_be_altered(tmp_path, allowed):
    """BUILD with slot state would set attributes on the object that a GLOBAL gave."""
    data_pkl = b"\x80\x02c" + f"{allowed}\n".encode() + b"N}(" + _s("__doc__") + _s("altered") + b"u\x86b."
    path = _write_archive(tmp_path / "alter.pt", data_pkl)
    with pytest.raises(ModelError, match="its data.pkl is damaged"):
        read_state_dict(path)
    assert torch.float32.__doc__ != "altered" and torch._utils._rebuild_tensor_v2.__doc__ != "altered"


def test_a_storage_with_a_bad_checksum_is_refused(tmp_path):
    path = _write_archive(tmp_path / "crc.pt", _outer())
    data = bytearray(path.read_bytes())
    data[data.find(_STORAGE) + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="its storage data/0 is damaged"):
        read_state_dict(path)


def _declare_size(path: Path, name: str, size: int, *, compressed_too: bool = False) -> Path:
    """Patch the sizes that the zip declares for record ``name`` (local header and central
    directory), leaving its bytes as they are: the zip fields are only what the file claims."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    fields = [local + 22] + ([local + 18] if compressed_too else [])  # uncompressed, compressed size
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(name.encode()) + 1)
    assert central > local and data[central + 46: central + 46 + len(name)] == name.encode()
    fields += [central + 24] + ([central + 20] if compressed_too else [])
    for offset in fields:
        data[offset: offset + 4] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    return path


def _claiming(numel: int) -> bytes:
    """data.pkl of :func:`_outer` with storage 0 declared as ``numel`` floats and the weight
    spanning all of them."""
    return _outer(weight=_tensor(numel=numel, size=(numel,), stride=(1,))).replace(_int(6), _int(numel))


@pytest.mark.parametrize("compressed_too", [False, True], ids=["file-size-lies", "both-sizes-lie"])
def test_a_storage_whose_zip_sizes_lie_is_refused(tmp_path, compressed_too):
    """24 real bytes declared as 20000 floats: never a tensor over memory the file does not hold."""
    path = _write_archive(tmp_path / "liar.pt", _claiming(20000))
    _declare_size(path, "archive/data/0", 20000 * 4, compressed_too=compressed_too)
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert "damaged" in _one_line_error(info, path, ARCHIVE_ADVICE)


def test_storages_cannot_declare_more_than_the_file_holds(tmp_path, monkeypatch):
    """A 2 KB archive that declares a 4 GB storage is refused before anything is allocated."""
    numel = (1 << 30) - 1  # the most a zip's 32-bit size field can declare
    path = _write_archive(tmp_path / "huge.pt", _claiming(numel))
    _declare_size(path, "archive/data/0", numel * 4, compressed_too=True)
    monkeypatch.setattr(torch.UntypedStorage, "from_buffer", None)  # any allocation fails the test
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert "its storages declare more bytes than the file's" in _one_line_error(info, path, ARCHIVE_ADVICE)


def test_the_cli_refuses_a_lying_storage_in_one_line(tmp_path):
    path = _declare_size(_write_archive(tmp_path / "liar.pt", _claiming(20000)),
                         "archive/data/0", 20000 * 4)
    run = _cli_segment(tmp_path, path)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "cannot read weights file" in lines[0] and "damaged" in lines[0], run.stderr


def test_truncated_zip_is_refused_in_one_sentence(tmp_path):
    whole = _openai_archive(tmp_path / "ViT-tiny.pt", traced=True).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    _one_line_error(info, path, "download it again or pass another file")


# -- weight errors: one whole sentence --------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def _openai_dict_without(key: str) -> dict:
    state = dict(_openai_style_clip().state_dict())
    state.pop(key)
    return {**state, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408)}


@pytest.mark.parametrize(
    "model, content, says, ending",
    [
        (TINY_MODEL, b"garbage" * 1000, "not a valid PyTorch, TorchScript or safetensors checkpoint",
         "download it again or pass another file"),
        (TINY_MODEL, lambda: {"visual.proj": _Exploit()}, "pickled Python objects (posix.system)",
         "or as .safetensors"),
        (TINY_DEEP_MODEL, lambda: make_tiny_clip().state_dict(), "does not fit model sclip-test-tiny-deep: 108 missing, e.g. visual.transformer.resblocks.3",
         "(--model in the CLI, Segmenter(model=...))"),
        (TINY_MODEL, lambda: {**make_tiny_clip().state_dict(), "visual.proj": torch.zeros(64, 16)},
         "1 of another shape, e.g. visual.proj is 64 x 16 in the file, 64 x 32 in the model",
         "(--model in the CLI, Segmenter(model=...))"),
        ("ViT-B-16", lambda: _openai_dict_without("visual.ln_post.weight"),
         "in OpenAI's layout but is not a CLIP ViT (RuntimeError: Error(s) in loading state_dict for CLIP",
         "pass OpenAI's ViT checkpoint or an open_clip state dict"),
    ],
    ids=["corrupt", "hostile-pickle", "other-model", "other-shape", "broken-openai-dict"],
)
def test_weight_errors_are_whole_sentences(tiny_dir, model, content, says, ending):
    """One line that names the file, says what is wrong and what to do, and is never cut."""
    path = tiny_dir / "weights-error.pt"
    if callable(content):
        torch.save(content(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        build_model(model, WeightsFile(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and says in message, message
    assert message.endswith(ending), message


@pytest.mark.parametrize("content", [{1: torch.zeros(2)}, {"state_dict": {(1, 2): torch.zeros(2)}}],
                         ids=["int-key", "tuple-key-in-state-dict"])
def test_a_state_dict_with_keys_that_are_not_text_is_refused_by_the_cli(tmp_path, content):
    path = tmp_path / "int-keys.pt"
    torch.save(content, path)
    run = _cli_segment(tmp_path, path)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [
        f"napari-sclip: error: weights file {path} holds entries whose names are not text; "
        "pass a state dict of a CLIP model"
    ], run.stderr


# -- activation: a warning exactly when the weights cannot tell ---------------------------------------

GELU_MODEL = "sclip-test-tiny-gelu"


@pytest.fixture
def gelu_model(tiny_dir) -> Path:
    """``sclip-test-tiny`` with a config that leaves the activation unset (as ViT-B-16's does), and
    a bare state dict for it."""
    import open_clip

    config = tiny_dir / f"{GELU_MODEL}.json"
    if GELU_MODEL not in open_clip.list_models():
        config.write_text(json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "quick_gelu"}))
        open_clip.add_model_config(config)
    return config


def _activation_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, ActivationWarning)]


def test_undecidable_activation_warns_once_naming_the_choice_and_the_switch(gelu_model, tiny_checkpoint):
    messages = _activation_warnings(lambda: build_model(GELU_MODEL, WeightsFile(tiny_checkpoint)))
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "using GELU" in messages[0] and tiny_checkpoint.name in messages[0]
    assert all(switch in messages[0] for switch in ("quick_gelu=True", "--quick-gelu", "QuickGELU under Advanced"))
    _, quick = build_model(GELU_MODEL, WeightsFile(tiny_checkpoint), quick_gelu=True)
    assert quick


def test_no_activation_warning_when_the_weights_or_the_caller_decide(gelu_model, tiny_checkpoint, tmp_path):
    archive = _openai_archive(tmp_path / "ViT-tiny.pt", traced=False)
    openai_dict = tmp_path / "openai-dict.pt"
    torch.save(_jit_state_dict(archive), openai_dict)  # with OpenAI's integer entries
    decided = [
        lambda: build_model("ViT-B-16", WeightsFile(archive)),  # TorchScript: OpenAI's
        lambda: build_model("ViT-B-16", WeightsFile(openai_dict)),
        lambda: build_model(TINY_MODEL, WeightsFile(tiny_checkpoint)),  # the config says QuickGELU
        lambda: build_model(GELU_MODEL, WeightsFile(tiny_checkpoint, tag="some-tag")),  # a tag says GELU
        lambda: build_model(GELU_MODEL, WeightsFile(tiny_checkpoint, tag="openai", quick_gelu=True)),
        lambda: build_model(GELU_MODEL, WeightsFile(tiny_checkpoint), quick_gelu=False),
        lambda: build_model(GELU_MODEL, WeightsFile(tiny_checkpoint), quick_gelu=True),
    ]
    for action in decided:
        assert _activation_warnings(action) == []


def _cli_in_subprocess(tmp_path: Path, gelu_model: Path, checkpoint: Path, *extra: str):
    """``napari-sclip segment`` in a fresh interpreter that knows the GELU test model."""
    image = tmp_path / "photo.png"
    Image.fromarray(natural_image(64, 80)).save(image)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    argv = ["segment", str(image), "--classes", "a; b", "--out", str(out), "--model", GELU_MODEL,
            "--pretrained", str(checkpoint), "--device", "cpu", "--quiet", *extra]
    code = (f"import open_clip, sys; open_clip.add_model_config({str(gelu_model)!r}); "
            f"from napari_sclip.cli import main; sys.exit(main({argv!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    metas = [json.loads(p.read_text()) for p in out.glob("*/meta/photo.json")]
    return run, metas


@pytest.mark.parametrize("switch, quick, warned", [((), False, True), (("--quick-gelu",), True, False),
                                                    (("--no-quick-gelu",), False, False)])
def test_cli_activation_switch_warning_and_provenance(tmp_path, gelu_model, tiny_checkpoint, switch, quick, warned):
    run, metas = _cli_in_subprocess(tmp_path, gelu_model, tiny_checkpoint, *switch)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    if warned:
        assert len(lines) == 1 and lines[0].startswith("napari-sclip: warning: tiny.pt does not say whether it needs QuickGELU"), run.stderr
        assert "using GELU" in lines[0] and "--quick-gelu" in lines[0]
    else:
        assert lines == []
    assert [meta["quick_gelu"] for meta in metas] == [quick]


def test_quick_gelu_choice_reaches_the_segmentation(gelu_model, tmp_path):
    """The switch changes the model, not just a record: the features differ."""
    path = tmp_path / "gelu.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    image = natural_image(64, 64)
    probs = [Segmenter(GELU_MODEL, str(path), "cpu", quick_gelu=q).segment(image, ["a", "b"], return_probs=True)
             for q in (True, False)]
    assert [r.params["quick_gelu"] for r in probs] == [True, False]
    assert np.abs(probs[0].probs - probs[1].probs).max() > 1e-4
