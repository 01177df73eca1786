"""PAMR, pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020), as the training-free
segmentation methods use it on their logits.

Inputs are the normalised image ``I`` (3, H, W) and logits ``L`` (N, H, W) at the same size.
For every dilation d, the 8 neighbours of a pixel at offsets (±d, 0, ±d) of a dilated 3 x 3 grid
(replicate padding) give 8 x len(dilations) neighbours n.  Per pixel::

    σ      = unbiased standard deviation, per image channel, of the 9 x len(dilations) values of
             the dilated 3 x 3 grids (centres included)
    a_n    = softmax over n of mean over channels of  -|I(p) - I(n)| / (1e-8 + 0.1 σ)
    L(p)  <- Σ_n a_n L(n),  repeated ``iterations`` times

Memory: :func:`refine_tile` needs about ``4 (3 N + 30) H W`` bytes for two dilations (neighbours
are visited one at a time, never stacked).  :func:`pamr_halo` says how far a tile must
reach beyond what it keeps for the kept part to equal a whole-image computation.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The 8 ring offsets of each dilated 3 x 3 grid, dilation by dilation."""
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


def pamr_halo(iterations: int, dilations: tuple[int, ...]) -> int:
    """How far beyond a tile its refined values depend on: each iteration reaches ``max(d)``
    further (the affinities' own reach is covered by the first)."""
    return max(dilations) * iterations


def _shifted(padded: torch.Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> torch.Tensor:
    """The (…, H, W) view of ``padded`` (padded by ``pad``) displaced by (dy, dx)."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _affinity(image: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """``(K, H, W)`` neighbour weights a_n, summing to 1 over the K neighbours."""
    _, height, width = image.shape
    pad = max(dilations)
    padded = F.pad(image[None], (pad,) * 4, mode="replicate")[0]  # (3, H + 2p, W + 2p)
    grid = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    # Two passes over views of the padded image (no stack of 18 shifted copies).
    mean = sum(_shifted(padded, dy, dx, pad, height, width) for dy, dx in grid) / len(grid)
    squares = sum((_shifted(padded, dy, dx, pad, height, width) - mean).square_() for dy, dx in grid)
    scale = squares.div_(len(grid) - 1).sqrt_().mul_(0.1).add_(1e-8).reciprocal_()  # (3, H, W)
    logits = torch.stack([
        (image - _shifted(padded, dy, dx, pad, height, width)).abs_().mul_(scale).mean(dim=0).neg_()
        for dy, dx in _offsets(dilations)
    ])  # (K, H, W)
    return torch.softmax(logits, dim=0)


def refine_tile(image: torch.Tensor, logits: torch.Tensor, iterations: int = 10,
                dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """PAMR of ``logits`` (N, H, W) guided by ``image`` (3, H, W); returns new (N, H, W) float32."""
    image, logits = image.float(), logits.float()
    height, width = logits.shape[-2:]
    affinity = _affinity(image, dilations)  # (K, H, W)
    offsets = _offsets(dilations)
    pad = max(dilations)
    for _ in range(iterations):
        padded = F.pad(logits[None], (pad,) * 4, mode="replicate")[0]
        refined = torch.zeros_like(logits)
        for weight, (dy, dx) in zip(affinity, offsets):
            refined.addcmul_(_shifted(padded, dy, dx, pad, height, width), weight)
        logits = refined
    return logits
