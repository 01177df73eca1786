"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation").

With ``Xb`` the tokens after block b (CLS first), per window:

1. outlier patches: the local outlier factor of ``X11``'s patch tokens (squared Euclidean
   distances, k = 30 nearest neighbours), above its 95th percentile;
2. ``X11``'s outliers are replaced by the mean of their non-outlier 8-neighbours (zero padding);
3. ``S = F9 F9ᵀ``, with ``F9`` = ``X9``'s patches, repaired the same way, L2-normalised;
4. ``x = agg(X11 patches, S)``;
5. ``x = attn12(ln_1(x)) + 0.3 cls``, where ``A = ½ [softmax(Z) + softmax(k kᵀ s)]`` and
   ``Z = 3 (S - mean S)`` with its negative entries set to -inf (shared by all heads), no residual
   and no MLP;
6. ``x = agg(x, F4 F4ᵀ)`` with ``F4`` = ``X4``'s patches, L2-normalised;
7. ``R = X4 + ... + X10``; ``x += agg(attn12(ln_1(R patches)) + 0.3 R[CLS], F4 F4ᵀ)``;
8. ``ln_post``, ``proj``, L2-normalise.

``agg(x, M)`` zeroes the entries of M below 0.4, divides each row by its sum + 1e-6 and returns
``M x``.  Every step is computed per window: a batch gives each window what it gets alone.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.errors import ModelError
from napari_sclip.engine.vit import (
    attention_path,
    embed_windows,
    patch_grid,
    project_patches,
    residual_block,
)

NEIGHBOURS = 30
OUTLIER_QUANTILE = 0.95
SIMILARITY_FLOOR = 0.4
CLS_WEIGHT = 0.3
TEMPERATURE = 3.0


def local_outlier_factor(points: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """``(B, P)`` local outlier factors of ``(B, P, D)`` points.

    With d the squared Euclidean distance and ``kdist(i)`` the distance to the k-th nearest other
    point, ``LOF(i)`` is the mean over i's k nearest neighbours j of ``kdist(i) / kdist(j)``: the
    simplified form the SC-CLIP authors compute (their reachability distances reduce to
    ``kdist(i)``).  k is at most P - 1.
    """
    k = min(neighbours, points.shape[1] - 1)
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist").square()  # (B, P, P)
    nearest, index = distances.topk(k + 1, dim=-1, largest=False)  # self first, at distance 0
    nearest, index = nearest[..., 1:], index[..., 1:]  # (B, P, k)
    kdist = nearest[..., -1]  # (B, P)
    density = k / kdist  # local reachability density
    neighbour_density = torch.gather(density[:, None, :].expand(-1, density.shape[1], -1), 2, index)
    return (neighbour_density / density[..., None]).mean(dim=-1)


def outlier_mask(points: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` bool: the patches whose LOF is above its 95th percentile (linear interpolation).
    A window of one patch has no neighbours and so no outliers."""
    if points.shape[1] < 2:
        return torch.zeros(points.shape[:2], dtype=torch.bool, device=points.device)
    lof = local_outlier_factor(points.float())
    return lof > torch.quantile(lof, OUTLIER_QUANTILE, dim=-1, keepdim=True)


def repair(patches: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace outlier patches by the mean of their non-outlier 8-neighbours on the grid (outside
    the grid counts as absent); a patch with none keeps its value.  ``(B, P, D)`` in and out."""
    batch, _, width = patches.shape
    rows, cols = grid
    valid = (~outliers).to(patches.dtype).reshape(batch, 1, rows, cols)
    feature_map = patches.transpose(1, 2).reshape(batch, width, rows, cols) * valid
    ring = torch.ones(1, 1, 3, 3, dtype=patches.dtype, device=patches.device)
    ring[..., 1, 1] = 0
    neighbour_sum = F.conv2d(feature_map.reshape(batch * width, 1, rows, cols), ring, padding=1)
    neighbour_sum = neighbour_sum.reshape(batch, width, rows * cols).transpose(1, 2)  # (B, P, D)
    neighbour_count = F.conv2d(valid, ring, padding=1).reshape(batch, rows * cols, 1)
    replace = outliers[..., None] & (neighbour_count > 0)
    return torch.where(replace, neighbour_sum / neighbour_count.clamp(min=1), patches)


def aggregate(x: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``agg(x, M)``: M's entries below 0.4 zeroed, rows divided by their sum + 1e-6, times x."""
    weights = similarity.masked_fill(similarity < SIMILARITY_FLOOR, 0.0)
    return (weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def _cosine_similarity(patches: torch.Tensor) -> torch.Tensor:
    normalised = F.normalize(patches, dim=-1)
    return normalised @ normalised.transpose(1, 2)  # (B, P, P)


def _calibrated_attention(similarity: torch.Tensor):
    """``A v`` with ``A = ½ [softmax(Z) + softmax(k kᵀ s)]``; Z from the block-9 similarity."""
    # The mean of the row means: with one window, a mean over both axes at once would be one
    # reduction that PyTorch splits across threads, and its last bit would depend on the batch.
    mean = similarity.mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)  # (B, 1, 1)
    z = (similarity - mean) * TEMPERATURE
    shared = torch.softmax(z.masked_fill(z < 0, float("-inf")), dim=-1)[:, None]  # (B, 1, P, P)

    def attend(q, k, v):
        return (shared.to(v.dtype) @ v + F.scaled_dot_product_attention(k, k, v)) / 2

    return attend


def scclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised SC-CLIP patch features of ``(B, 3, H, W)`` windows."""
    grid = patch_grid(visual, pixels)
    *blocks, last = visual.transformer.resblocks
    x = embed_windows(visual, pixels)
    hidden = []  # hidden[b - 1] = X_b, for b = 1 .. L-1
    for block in blocks:
        x = residual_block(block, x)
        hidden.append(x)
    if len(hidden) < 10:
        raise ModelError(f"SC-CLIP needs a ViT of at least 11 blocks; this one has {len(blocks) + 1}")
    x_last, x_9, x_4 = hidden[-1], hidden[8], hidden[3]  # X11, X9, X4 in ViT-B/16

    outliers = outlier_mask(x_last[:, 1:])  # (B, P)
    patches = repair(x_last[:, 1:], outliers, grid)  # (B, P, width)
    similarity = _cosine_similarity(repair(x_9[:, 1:], outliers, grid))  # (B, P, P)
    attend = _calibrated_attention(similarity)
    x = attention_path(last, aggregate(patches, similarity), attend) + CLS_WEIGHT * x_last[:, :1]

    post_similarity = _cosine_similarity(x_4[:, 1:])
    x = aggregate(x, post_similarity)
    fused = torch.stack(hidden[3:10]).sum(dim=0)  # X4 + ... + X10, CLS included
    r = attention_path(last, fused[:, 1:], attend) + CLS_WEIGHT * fused[:, :1]
    x = x + aggregate(r, post_similarity)
    return project_patches(visual, x, grid)
