"""Reading the tensors of a TorchScript archive without running any TorchScript.

``torch.jit.save`` (and so OpenAI's released CLIP ``.pt`` files) writes a zip whose records all
sit under one folder, ``<name>/``:

* ``data.pkl``: the module tree, pickled by TorchScript's pickler.  Each module is an object of a
  ``__torch__.*`` class whose state is a dict of its attributes (parameters, buffers, submodules,
  ``training``, ...); each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, ...)`` and each storage a persistent id ``("storage", torch.<Type>Storage, key,
  location, numel)``.
* ``data/<key>``: the raw bytes of one storage, stored uncompressed, in the byte order that
  ``byteorder`` names (little-endian when that record is absent, as in older archives).
* ``code/``: the classes' TorchScript source.  Each module class starts with two declarations,
  ``__parameters__ = ["weight", ...]`` and ``__buffers__ = [...]``: they are what makes an attribute
  part of ``state_dict()``.

``torch.jit.load`` compiles ``code/`` and, while unpickling, calls any ``__setstate__`` that it
defines, so a hostile archive runs code as it loads.  Here ``data.pkl`` goes through an unpickler
that rebuilds only tensors and plain containers: a ``__torch__`` class becomes an inert stand-in
that records its state, and anything else a pickle may ask for is refused.  ``code/`` is read as
text for the two declarations above, never compiled; a module class that restores itself with
``__setstate__`` is refused, since only its code knows what its state means.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.engine._torch import torch

#: Records read whole (``data.pkl``, source files) are far smaller than this in real archives.
_MAX_RECORD_BYTES = 64 << 20
_STORAGE_DTYPES = {
    f"{name}Storage": dtype
    for name, dtype in (
        ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
        ("Double", torch.float64), ("Long", torch.int64), ("Int", torch.int32),
        ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
    )
}
_SIMPLE_NAME = re.compile(r"\w{1,200}", re.ASCII)
_QUALIFIED_NAME = re.compile(r"__torch__(\.\w{1,200}){0,50}", re.ASCII)
# A module class's header and its indented body, in TorchScript's printed source.
_MODULE_CLASS = re.compile(r"^class (\w+)\(Module\):[^\n]*\n((?:[ \t][^\n]*\n|\n)*)", re.MULTILINE)


class ArchiveError(Exception):
    """The archive is malformed or asks for more than tensors; the message is a clause that
    completes "cannot read weights file ...: "."""


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a zip with TorchScript's records (``code/``, ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist()
            )
    except (zipfile.BadZipFile, OSError):
        return False


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The archive's ``name -> tensor``, as ``torch.jit.load(path).state_dict()`` would give it
    (on the CPU, in the stored dtypes), without running anything from the archive."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        _check_storage_sizes(archive, prefix, path.stat().st_size)
        root = _ArchiveUnpickler(archive, prefix).load_root()
        state: dict[str, torch.Tensor] = {}
        _collect_state(root, "", _ClassDeclarations(archive, prefix), state, set())
        return state


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    """The folder that holds ``data.pkl``, after checking every record's name."""
    names = [info.filename for info in archive.infolist()]
    for name in names:
        parts = name.rstrip("/").split("/")
        if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise ArchiveError(f"it holds a record named {_shown(name)}, which no PyTorch archive has")
    if len(set(names)) != len(names):
        raise ArchiveError("it holds two records under one name, which no PyTorch archive has")
    pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ArchiveError("it does not have exactly one data.pkl record, as a TorchScript archive has")
    return pickles[0].split("/")[0]


def _check_storage_sizes(archive: zipfile.ZipFile, prefix: str, archive_bytes: int) -> None:
    """Storages are stored uncompressed, so together they cannot declare more bytes than the file
    has: checked before any is allocated, as a zip's size fields are only what it claims."""
    storages = [info for info in archive.infolist() if info.filename.startswith(f"{prefix}/data/")]
    for info in storages:
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ArchiveError(f"its record {_shown(info.filename)} gives two different sizes, so it is damaged")
    if sum(info.file_size for info in storages) > archive_bytes:
        raise ArchiveError(f"its storages declare more bytes than the file's {archive_bytes}, so it is damaged")


def _read_record(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > _MAX_RECORD_BYTES:
        raise ArchiveError(f"its record {_shown(name)} is larger than any TorchScript archive's")
    return archive.read(info)


def _shown(text: str) -> str:
    """Archive-supplied text fit for a one-line message."""
    return text if re.fullmatch(r"[\w./:-]{1,120}", text, re.ASCII) else "<unprintable name>"


class _ScriptObject:
    """Stands in for an object of a TorchScript class: it records the state it is given and runs
    nothing.  :meth:`_ArchiveUnpickler.find_class` makes one subclass per class name."""

    qualified_name = ""

    def __setstate__(self, state) -> None:
        self.state = state


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensors from the archive's storages, plain containers, inert
    stand-ins for TorchScript classes, and nothing else."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(_read_record(archive, f"{prefix}/data.pkl")))
        self._archive = archive
        self._prefix = prefix
        self._byteorder = self._read_byteorder()
        self._keys: dict[str, object] = {}  # storage key -> its token
        # id(token) -> (token, storage, dtype, numel); holding the token keeps its id unique.
        # The storage holds exactly numel elements (_read_storage checks the bytes it read).
        self._tokens: dict[int, tuple[object, torch.UntypedStorage, torch.dtype, int]] = {}
        self._classes: dict[str, type] = {}
        # Fresh bound methods per reader: a pickle can neither call nor alter anything shared.
        self._allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("collections", "OrderedDict"): collections.OrderedDict,
            # TorchScript tags typed lists and dicts with these; the value is all we need.
            ("torch.jit._pickle", "build_intlist"): self._same_value,
            ("torch.jit._pickle", "build_doublelist"): self._same_value,
            ("torch.jit._pickle", "build_boollist"): self._same_value,
            ("torch.jit._pickle", "build_tensorlist"): self._same_value,
            ("torch.jit._pickle", "restore_type_tag"): self._same_value,
        }

    def load_root(self) -> _ScriptObject:
        try:
            root = self.load()
        except ArchiveError:
            raise
        except Exception as exc:  # the pickle machine's own errors: truncated or nonsensical data
            raise ArchiveError(f"its data.pkl is damaged ({type(exc).__name__})") from None
        if not isinstance(root, _ScriptObject):
            raise ArchiveError("its data.pkl does not hold a TorchScript module")
        return root

    def _read_byteorder(self) -> str:
        name = f"{self._prefix}/byteorder"
        if name not in self._archive.namelist():
            return "little"
        order = _read_record(self._archive, name).decode("ascii", "replace")
        if order not in ("little", "big"):
            raise ArchiveError("its byteorder record names neither little nor big endian")
        return order

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if _QUALIFIED_NAME.fullmatch(module) and _SIMPLE_NAME.fullmatch(name):
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise ArchiveError(f"its data.pkl asks for {_shown(qualified)}, which a checkpoint never needs")

    def persistent_load(self, pid):
        """``("storage", dtype, key, location, numel)`` -> a token that only this reader maps back
        to the storage it read from ``data/<key>`` (tokens cannot be forged or altered)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError("its data.pkl refers to something other than a tensor storage")
        _, dtype, key, location, numel = pid
        if not (isinstance(dtype, torch.dtype) and isinstance(key, str) and _SIMPLE_NAME.fullmatch(key)
                and isinstance(location, str) and _is_count(numel)):
            raise ArchiveError("its data.pkl describes a tensor storage in a way PyTorch never does")
        if key in self._keys:
            token, _, known_dtype, known_numel = self._tokens[id(self._keys[key])]
            if (known_dtype, known_numel) != (dtype, numel):
                raise ArchiveError(f"its data.pkl gives storage {key} two different types or sizes")
            return token
        token = object()
        self._tokens[id(token)] = (token, self._read_storage(key, dtype, numel), dtype, numel)
        self._keys[key] = token
        return token

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.UntypedStorage:
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"it has no record data/{key} for a storage its data.pkl uses") from None
        expected = numel * dtype.itemsize
        if info.file_size != expected or info.compress_type != zipfile.ZIP_STORED:
            raise ArchiveError(
                f"its storage data/{key} holds {info.file_size} bytes where its data.pkl declares {expected}"
                if info.file_size != expected else f"its storage data/{key} is compressed, which PyTorch never does"
            )
        try:
            data = self._archive.read(info)
        except (zipfile.BadZipFile, EOFError) as exc:  # a bad checksum, a cut file
            raise ArchiveError(f"its storage data/{key} is damaged ({type(exc).__name__})") from None
        if len(data) != expected:  # zipfile stops at the record's stored size, whatever file_size says
            raise ArchiveError(f"its storage data/{key} holds {len(data)} bytes where its data.pkl declares {expected}")
        if not data:
            return torch.UntypedStorage(0)
        # Decoded from the archive's byte order into this machine's.
        return torch.UntypedStorage.from_buffer(data, byte_order=self._byteorder, dtype=dtype)

    def _rebuild_tensor(self, token, offset, size, stride, requires_grad, hooks, metadata=None):
        """``torch._utils._rebuild_tensor_v2``'s arguments -> a tensor on one of our storages,
        inside its bounds (``set_`` would silently grow the storage otherwise)."""
        known, storage, dtype, _ = self._tokens.get(id(token), (None, None, None, 0))
        if known is not token:
            raise ArchiveError("its data.pkl builds a tensor from something other than a storage")
        if not (_is_count(offset) and _is_shape(size) and _is_shape(stride) and len(size) == len(stride)):
            raise ArchiveError("its data.pkl gives a tensor an impossible size, stride or offset")
        if metadata:
            raise ArchiveError("its data.pkl marks a tensor as conjugated or negated, which weights never are")
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
        if end * dtype.itemsize > storage.nbytes():
            raise ArchiveError("its data.pkl places a tensor beyond the end of its storage")
        return torch.empty(0, dtype=dtype).set_(storage, offset, tuple(size), tuple(stride))

    def _same_value(self, value, *_type_tag):
        return value


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) <= 64 and all(_is_count(v) for v in value)


@dataclass(frozen=True)
class _ModuleClass:
    parameters: frozenset[str]
    buffers: frozenset[str]
    sets_state: bool


class _ClassDeclarations:
    """The module classes of ``code/``, from their declarations only (the source is never compiled)."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive = archive
        self._prefix = prefix
        self._files: dict[str, dict[str, _ModuleClass]] = {}

    def module_class(self, qualified_name: str) -> _ModuleClass | None:
        """The declarations of ``__torch__.a.b.Name`` (in ``code/__torch__/a/b.py``), or ``None``
        when it is not a module class."""
        module, _, name = qualified_name.rpartition(".")
        if module not in self._files:
            record = f"{self._prefix}/code/{module.replace('.', '/')}.py"
            source = ""
            if record in self._archive.namelist():
                source = _read_record(self._archive, record).decode("utf-8", "replace")
            self._files[module] = _parse_module_classes(source)
        return self._files[module].get(name)


def _parse_module_classes(source: str) -> dict[str, _ModuleClass]:
    def names(body: str, field: str) -> frozenset[str]:
        found = re.search(rf"^[ \t]+{field} = \[([^\]\n]*)\]", body, re.MULTILINE)
        return frozenset(re.findall(r'"([^"]*)"', found.group(1))) if found else frozenset()

    return {
        match.group(1): _ModuleClass(
            names(match.group(2), "__parameters__"),
            names(match.group(2), "__buffers__"),
            re.search(r"^[ \t]+def __setstate__\(", match.group(2), re.MULTILINE) is not None,
        )
        for match in _MODULE_CLASS.finditer(source)
    }


def _collect_state(
    obj: _ScriptObject, prefix: str, classes: _ClassDeclarations, out: dict, seen: set[int]
) -> None:
    """Add ``obj``'s parameters, then its buffers, then its submodules' state, under ``prefix``:
    the order and the names of ``state_dict()``."""
    declared = classes.module_class(obj.qualified_name)
    if declared is None:
        if not prefix:
            raise ArchiveError("its data.pkl does not hold a TorchScript module")
        return  # an object of a plain TorchScript class: never part of state_dict()
    where = f"module {_shown(prefix.rstrip('.'))}" if prefix else "its top-level module"
    if declared.sets_state:
        raise ArchiveError(f"{where} restores itself with TorchScript code (__setstate__), which is never run")
    if id(obj) in seen:  # a cycle, or a module used twice, which TorchScript never writes
        raise ArchiveError(f"{where} appears twice in its data.pkl")
    seen.add(id(obj))
    state = getattr(obj, "state", None)
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise ArchiveError(f"the state of {where} in its data.pkl is not a module's")
    for names in (declared.parameters, declared.buffers):
        for name, value in state.items():
            if name in names and value is not None:
                if not isinstance(value, torch.Tensor):
                    raise ArchiveError(f"{_shown(prefix + name)} in its data.pkl is not a tensor")
                out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject):
            _collect_state(value, f"{prefix}{name}.", classes, out, seen)
