"""Reading images from disk for batch segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_sclip.engine.errors import ImageError

#: Suffixes the CLI picks up when given a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


def find_images(paths: list[str | Path]) -> list[Path]:
    """Expand folders (not recursively) to their image files; keep files as given.

    Raises :class:`ImageError` for a path that does not exist or a folder without images.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ImageError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"image not found: {path}")
    return list(dict.fromkeys(found))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as a numpy array in its own dtype: (H, W), (H, W, C) or a stack for TIFFs.

    TIFFs go through tifffile (16-bit, float and multi-page data keep their values); everything
    else through Pillow, with the EXIF orientation applied and palette images expanded to RGB(A).
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image, ImageOps

        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
            return np.asarray(image)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise ImageError(f"cannot read image {path}: {reason}") from None


def image_planes(image: np.ndarray) -> list[tuple[tuple[int, ...] | None, np.ndarray]]:
    """The 2D images in ``image`` with their index along the leading axes.

    ``(H, W)`` and ``(H, W, C)`` with at most 4 channels are one image (index ``None``); anything
    else is a stack: ``(..., H, W)``, or ``(..., H, W, C)`` when the last axis has 1 to 4 entries,
    gives one image per leading index (``(Z, H, W)`` TIFFs, time series, RGB stacks).
    """
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] <= 4):
        return [(None, image)]
    if image.ndim < 2:
        raise ImageError(f"image of shape {image.shape} is not 2D")
    lead = image.shape[:-3] if image.shape[-1] <= 4 else image.shape[:-2]
    return [(index, image[index]) for index in np.ndindex(*lead)]
