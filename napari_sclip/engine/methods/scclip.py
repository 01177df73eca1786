"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation").

With ``Xb`` the tokens after block b (CLS first), per window of a 12-block ViT (B/16):

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

Other depths read other blocks (:func:`scclip_layers`): the outliers always come from the
next-to-last block, X(L-1); the similarity, post-aggregation and fusion blocks and the CLS
weight are the authors' for 12 and 24 blocks and scaled from them otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
TEMPERATURE = 3.0


@dataclass(frozen=True)
class ScclipLayers:
    """The blocks SC-CLIP reads, as 0-based indices into ``hidden = [X1, ..., X(L-1)]`` (the
    outputs of all blocks but the last), and its CLS weight.

    Attributes
    ----------
    similarity
        The block whose repaired, normalised patches give ``S`` (X9 in ViT-B/16: 8).
    post
        The block whose normalised patches give the post-aggregation matrix (X4: 3).
    fuse_start, fuse_end
        ``R`` sums ``hidden[fuse_start:fuse_end]`` (X4 .. X10: 3, 10).
    cls_weight
        The weight of the CLS token added after the last block's attention (0.3).
    rule
        Where the numbers come from: the authors' settings for this depth, or our scaling.
    """

    similarity: int
    post: int
    fuse_start: int
    fuse_end: int
    cls_weight: float
    rule: str

    def as_params(self) -> dict:
        return asdict(self)


#: The authors' settings per depth: ViT-B/16 in their configs (commit 0417ba9), ViT-L/14 in the
#: commented-out block of their first commit's configs/base_config.py (74471da).
_AUTHORS_LAYERS = {
    12: ScclipLayers(8, 3, 3, 10, 0.3, "authors' ViT-B/16 setting"),
    24: ScclipLayers(16, 6, 8, 19, 0.1, "authors' ViT-L/14 setting"),
}


def scclip_layers(depth: int) -> ScclipLayers:
    """SC-CLIP's blocks for a ViT of ``depth`` blocks.

    12 and 24 blocks get the authors' settings.  Other depths get ours: each index of the
    nearest published depth d (12 up to 18 blocks, 24 above) scaled by ``depth / d`` and rounded
    half up, kept inside ``hidden`` (and the fusion range non-empty), with d's CLS weight.
    """
    if depth < 2:
        raise ModelError(f"SC-CLIP needs a ViT of at least 2 blocks; this one has {depth}")
    if depth in _AUTHORS_LAYERS:
        return _AUTHORS_LAYERS[depth]
    base = _AUTHORS_LAYERS[12 if depth <= 18 else 24]
    scale = depth / (12 if depth <= 18 else 24)
    last = depth - 2  # the last index of hidden

    def scaled(index: int) -> int:
        return min(max(int(index * scale + 0.5), 0), last)

    start = scaled(base.fuse_start)
    end = min(max(int(base.fuse_end * scale + 0.5), start + 1), last + 1)
    return ScclipLayers(scaled(base.similarity), scaled(base.post), start, end, base.cls_weight,
                        f"ours: the authors' {12 if depth <= 18 else 24}-block setting scaled to {depth} blocks")


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


def scclip_settings(visual: torch.nn.Module) -> dict:
    """What results record of SC-CLIP on this ViT: :func:`scclip_layers` of its depth."""
    return {"sc_clip_layers": scclip_layers(len(visual.transformer.resblocks)).as_params()}


def scclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised SC-CLIP patch features of ``(B, 3, H, W)`` windows."""
    grid = patch_grid(visual, pixels)
    *blocks, last = visual.transformer.resblocks
    layers = scclip_layers(len(blocks) + 1)
    x = embed_windows(visual, pixels)
    hidden = []  # hidden[b - 1] = X_b, for b = 1 .. L-1
    for block in blocks:
        x = residual_block(block, x)
        hidden.append(x)
    x_last, x_sim, x_post = hidden[-1], hidden[layers.similarity], hidden[layers.post]  # X11, X9, X4 in B/16

    outliers = outlier_mask(x_last[:, 1:])  # (B, P)
    patches = repair(x_last[:, 1:], outliers, grid)  # (B, P, width)
    similarity = _cosine_similarity(repair(x_sim[:, 1:], outliers, grid))  # (B, P, P)
    attend = _calibrated_attention(similarity)
    x = attention_path(last, aggregate(patches, similarity), attend) + layers.cls_weight * x_last[:, :1]

    post_similarity = _cosine_similarity(x_post[:, 1:])
    x = aggregate(x, post_similarity)
    fused = torch.stack(hidden[layers.fuse_start:layers.fuse_end]).sum(dim=0)  # X4 + ... + X10, CLS included
    r = attention_path(last, fused[:, 1:], attend) + layers.cls_weight * fused[:, :1]
    x = x + aggregate(r, post_similarity)
    return project_patches(visual, x, grid)
