"""Reading image files for batch segmentation: their pixels and where their 2D slices are.

Which axes are slices and which are channels is decided by
:func:`napari_sclip.engine.image.image_layout` alone; TIFFs give it the axis names that tifffile
reads from ImageJ and OME metadata.

Size: one 2D slice may have up to :func:`pixel_limit` pixels, Pillow's decompression-bomb bound
(178,956,970 by default: 13000 x 13000 fits).  Within it, no warning is printed; beyond it, the
file is refused with one line, before its pixels are decoded.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from napari_sclip.engine.errors import ImageError
from napari_sclip.engine.image import Layout, image_layout

#: Suffixes the CLI picks up when given a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
_TIFF_SUFFIXES = (".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
_PILLOW_WARNINGS = threading.Lock()


def find_images(paths: list[str | Path], recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Expand folders to their image files (with ``recursive``, those of their subfolders too,
    but not linked folders), hidden files and folders left out (macOS's "._x.jpg" copies are not
    images), in name order; keep files as given.  Nothing
    inside ``exclude`` (the dataset being written, say) is taken from a folder.

    Raises :class:`ImageError` for a path that does not exist, a folder without images, or a
    folder inside ``exclude``.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            if exclude is not None and inside(path, exclude):
                raise ImageError(f"folder {path} is in the dataset being written ({exclude}); give the images' folder")
            images = [p for p in _folder_files(path, recursive, exclude)
                      if p.suffix.lower() in IMAGE_SUFFIXES and not (exclude is not None and inside(p, exclude))]
            if not images:
                where = "or its subfolders " if recursive else ""
                hint = "" if recursive else "; --recursive takes subfolders too"
                raise ImageError(f"folder {path} {where}holds no images ({', '.join(IMAGE_SUFFIXES)}){hint}")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"image not found: {path}")
    return list(dict.fromkeys(found))


def _folder_files(folder: Path, recursive: bool, exclude: Path | None) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    from napari_sclip._files import describe_os_error, files_under

    def unlistable(exc: OSError) -> None:
        raise ImageError(f"cannot list a subfolder: {describe_os_error(exc)}")

    skip = os.path.realpath(exclude) if exclude is not None else None
    names = files_under(folder, skip, onerror=unlistable)
    return [folder / name for name in names if os.path.isfile(folder / name)]


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, whatever links either is spelled through."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return (real + os.sep).startswith(top.rstrip(os.sep) + os.sep)


def exif_orientation(path: str | Path) -> int:
    """A JPEG's or PNG's EXIF orientation: 1 (or no tag) means its pixels are shown as stored;
    anything else turns or mirrors them.  1 for files Pillow cannot open."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
            with Image.open(path, formats=pillow_formats()) as image:
                return orientation_of(image)
    except Exception:
        return 1


def orientation_of(image) -> int:
    """An open Pillow image's EXIF orientation (1 when it has none)."""
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))


def pixel_limit() -> int | None:
    """The most pixels one 2D slice may have: twice ``PIL.Image.MAX_IMAGE_PIXELS``, the size at
    which Pillow refuses a file as a decompression bomb (178,956,970 by default: 13000 x 13000
    fits).  Raise ``PIL.Image.MAX_IMAGE_PIXELS`` to read larger images; ``None`` there removes
    the bound."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def read_image(path: str | Path) -> np.ndarray:
    """The pixels of an image file in its own dtype (see :func:`read_with_layout`), all decoded."""
    data = read_with_layout(path)[0]
    try:
        return np.asarray(data)
    except ImageError as exc:  # a page of a compressed stack is damaged
        raise ImageError(f"{path}: {exc}") from None


def read_with_layout(path: str | Path) -> tuple[np.ndarray, Layout]:
    """Read an image file and say where its 2D slices are.

    TIFFs go through tifffile (16-bit, float and multi-page data keep their values; the first
    series, full resolution; uncompressed data is memory-mapped, read-only, and a compressed stack
    of pages comes as an array-like that decodes the pages an index selects); everything else
    through Pillow (the first frame), with the EXIF orientation applied and palette and CMYK
    images expanded to RGB(A).

    Raises
    ------
    ImageError
        One line starting with the path: missing, empty, damaged or unknown files, too many
        pixels, more than 4 channels.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        if path.suffix.lower() in _TIFF_SUFFIXES:
            return _read_tiff(path)
        return _read_with_pillow(path)
    except ImageError:
        raise
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split())[:160]
        raise ImageError(f"{path}: cannot read image: {reason}") from None
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ImageError(f"{path}: cannot read image: {reason}") from None


def slice_indices(path: str | Path) -> list[tuple[int, ...] | None]:
    """The index of every 2D slice of an image file (``[None]`` for a single 2D image), from its
    header alone: a TIFF's first series (tifffile), one image for any other format (Pillow reads
    one frame).  Damage is found when the file is read (:func:`read_with_layout`).

    Raises
    ------
    ImageError
        One line starting with the path, for a TIFF whose header cannot be read or that holds no
        image or an unusable shape.
    """
    path = Path(path)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return [None]
    import tifffile

    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
            series = tif.series[0] if tif.series else None
            layout = _layout(path, series.shape, series.axes) if series is not None and not errors else None
    except ImageError:
        raise
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ImageError(f"{path}: cannot read image: {reason}") from None
    if errors:
        raise ImageError(f"{path}: damaged TIFF: {errors[0]}")
    if layout is None:
        raise ImageError(f"{path}: the TIFF holds no image")
    return list(layout.indices())


def _read_tiff(path: Path) -> tuple[np.ndarray, Layout]:
    import tifffile

    with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
        series = tif.series[0] if tif.series else None
        if series is not None and not errors:
            layout = _layout(path, series.shape, series.axes)
            pixels, limit = layout.shape[layout.rows] * layout.shape[layout.cols], pixel_limit()
            if limit is not None and pixels > limit:
                raise _too_large(path, pixels)
            # An uncompressed stack in native byte order is mapped, and a compressed one whose
            # pages are its slices is read a page at a time: either way slices are read as they
            # are segmented, so a stack larger than memory (or a small file that decodes to a
            # huge one) never has to fit in it.
            mappable = series.dataoffset is not None and series.keyframe.is_memmappable
            native = np.dtype(tif.byteorder + series.dtype.char).isnative
            if mappable and native:
                data = series.asarray(out="memmap")
            elif _PagedStack.fits(series):
                data = _PagedStack(tifffile.TiffFile(path))  # its own handle, open while it lives
            else:
                data = series.asarray()
    # tifffile logs damage (a bad page offset: a truncated stack) and reads what it can.
    if errors:
        raise ImageError(f"{path}: damaged TIFF: {errors[0]}")
    if series is None:
        raise ImageError(f"{path}: the TIFF holds no image")
    return data, layout


class _PagedStack:
    """A TIFF stack whose pages are decoded when indexed: ``stack[key]`` reads only the pages
    that ``key`` selects.  Damage found in a page raises :class:`ImageError` (without the path,
    which callers add)."""

    def __init__(self, tif):
        series = tif.series[0]
        self._pages = list(series.pages)
        self.shape = tuple(series.shape)
        self.dtype = np.dtype(series.dtype)
        self.ndim = len(self.shape)
        self._leading = self.shape[: self.ndim - len(series.keyframe.shape)]  # one page each
        weakref.finalize(self, tif.close)  # the file stays open while its slices may be read

    @staticmethod
    def fits(series) -> bool:
        """Whether ``series`` is a stack of whole pages, each one its trailing axes."""
        page = tuple(series.keyframe.shape)
        pages = list(series.pages)
        return (len(pages) > 1 and None not in pages and tuple(series.shape[-len(page):]) == page
                and int(np.prod(series.shape[: len(series.shape) - len(page)])) == len(pages))

    def __getitem__(self, key) -> np.ndarray:
        key = (key if isinstance(key, tuple) else (key,)) + (slice(None),) * self.ndim
        lead, rest = key[: len(self._leading)], key[len(self._leading): self.ndim]
        numbers = np.arange(len(self._pages)).reshape(self._leading)[lead]
        with _tifffile_errors() as errors:
            try:
                planes = [self._pages[n].asarray() for n in numbers.ravel()]
            except Exception as exc:  # a page that cannot be decoded
                errors.append(" ".join(str(exc).split())[:160] or type(exc).__name__)
        if errors:
            raise ImageError(f"damaged TIFF: {errors[0]}")
        stacked = np.stack(planes).reshape(numbers.shape + planes[0].shape)
        return stacked[(slice(None),) * numbers.ndim + rest]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype)


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect the errors tifffile logs while this thread reads, instead of printing them; its
    warnings (odd but harmless tags) are dropped."""
    thread = threading.get_ident()
    errors: list[str] = []

    def collect(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        if record.levelno >= logging.ERROR:
            errors.append(re.sub(r"^<[^>]*>\s*", "", " ".join(record.getMessage().split())))
        return False

    logger = logging.getLogger("tifffile")
    logger.addFilter(collect)
    try:
        yield errors
    finally:
        logger.removeFilter(collect)


@functools.cache
def pillow_formats() -> tuple[str, ...]:
    """The formats Pillow may open for us: every one it reads but those it hands to another
    program (EPS to Ghostscript, WMF to the system).  Pillow picks a decoder from a file's
    content, not its name, so a ``.png`` from someone else could be PostScript."""
    from PIL import Image

    Image.init()
    return tuple(name for name in Image.OPEN if name not in ("EPS", "WMF"))


def _read_with_pillow(path: Path) -> tuple[np.ndarray, Layout]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Our own bound replaces Pillow's warning; its error stays, and is reported below.  The
        # lock: warning filters are the process's, and batch readers open images in threads.
        with _PILLOW_WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=pillow_formats())
    except Image.DecompressionBombError:
        raise _too_large(path, None) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: cannot read image: not an image format Pillow knows, or damaged") from None
    with image:
        if orientation_of(image) != 1:  # exif_transpose copies even when upright
            image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
        data = np.asarray(image)
    return data, _layout(path, data.shape)


def _layout(path: Path, shape, axes: str | None = None) -> Layout:
    try:
        return image_layout(shape, axes)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def _too_large(path: Path, pixels: int | None) -> ImageError:
    """The error for a slice over :func:`pixel_limit` (``pixels``: how many, when known)."""
    size = f" {pixels:,} pixels," if pixels is not None else ""
    return ImageError(
        f"{path}:{size} over the {pixel_limit():,} pixels per image that napari-sclip reads "
        "(Pillow's decompression-bomb bound); crop it or cut it into tiles first"
    )
