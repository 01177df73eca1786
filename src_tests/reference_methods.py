"""Plain renderings of the later training-free methods and of PAMR, written from their equations
(issue 5) for checking the engine: explicit per-head attention matrices, Python loops where a
loop is the definition, one window at a time.  Nothing is shared with the engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from reference_sclip import image_features_reference, positional_embedding_reference


def _heads(x: torch.Tensor, attn: torch.nn.MultiheadAttention):
    """Per-head q, k, v lists for a (1, T, D) input."""
    width = x.shape[-1]
    head_dim = width // attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    parts = [slice(h * head_dim, (h + 1) * head_dim) for h in range(attn.num_heads)]
    return [q[..., p] for p in parts], [k[..., p] for p in parts], [v[..., p] for p in parts], head_dim**-0.5


def attention_reference(x, attn, kind: str, bias=None, similarity=None) -> torch.Tensor:
    """out_proj(A v) for one (1, T, D) input, A spelt out per head:

    naclip: softmax(k kᵀ s + bias); clearclip: softmax(q qᵀ s); maskclip: identity;
    scclip: ½ [softmax(Z) + softmax(k kᵀ s)], Z = 3 (S - mean S) with negatives -inf.
    """
    qs, ks, vs, scale = _heads(x, attn)
    outputs = []
    for q, k, v in zip(qs, ks, vs):
        if kind == "naclip":
            a = torch.softmax(k @ k.transpose(1, 2) * scale + bias, dim=-1)
        elif kind == "clearclip":
            a = torch.softmax(q @ q.transpose(1, 2) * scale, dim=-1)
        elif kind == "maskclip":
            a = torch.eye(x.shape[1])[None]
        elif kind == "scclip":
            z = (similarity - similarity.mean()) * 3.0
            z = torch.where(z < 0, torch.tensor(float("-inf")), z)
            a = (torch.softmax(z, dim=-1) + torch.softmax(k @ k.transpose(1, 2) * scale, dim=-1)) / 2
        else:
            raise ValueError(kind)
        outputs.append(a @ v)
    return attn.out_proj(torch.cat(outputs, dim=-1))


def naclip_bias_reference(rows: int, cols: int, sigma: float = 5.0) -> torch.Tensor:
    """G by a loop over patch pairs (CLS first, zero row and column)."""
    tokens = 1 + rows * cols
    bias = torch.zeros(tokens, tokens)
    for p in range(rows * cols):
        for q in range(rows * cols):
            di, dj = q // cols - p // cols, q % cols - p % cols
            bias[1 + p, 1 + q] = math.exp(-((di / (sigma * math.sqrt(2))) ** 2 + (dj / (sigma * math.sqrt(2))) ** 2))
    return bias


def lof_reference(points: np.ndarray, k: int) -> np.ndarray:
    """LOF(i) = mean over i's k nearest j of kdist(i) / kdist(j), by loops (float64)."""
    n = len(points)
    d = [[float(((points[i] - points[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    neighbours, kdist = [], []
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: d[i][j])[:k]
        neighbours.append(order)
        kdist.append(d[i][order[-1]])
    return np.array([np.mean([kdist[i] / kdist[j] for j in neighbours[i]]) for i in range(n)])


def repair_reference(patches: np.ndarray, outliers: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Each outlier becomes the mean of its in-grid, non-outlier 8-neighbours (if any)."""
    out = patches.copy()
    for p in np.flatnonzero(outliers):
        r, c = divmod(p, cols)
        found = [
            patches[(r + dr) * cols + (c + dc)]
            for dr in (-1, 0, 1) for dc in (-1, 0, 1)
            if (dr, dc) != (0, 0) and 0 <= r + dr < rows and 0 <= c + dc < cols
            and not outliers[(r + dr) * cols + (c + dc)]
        ]
        if found:
            out[p] = np.mean(found, axis=0)
    return out


def aggregate_reference(x: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    m = torch.where(similarity < 0.4, torch.zeros(()), similarity)
    return (m / (m.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def pamr_loop_reference(image: np.ndarray, logits: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """PAMR pixel by pixel (float64): (3, H, W) image, (N, H, W) logits."""
    _, h, w = image.shape
    clamp = lambda y, x: (min(max(y, 0), h - 1), min(max(x, 0), w - 1))  # noqa: E731 - replicate pad
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    grid = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    weights = np.zeros((len(dilations) * 8, h, w))
    for y in range(h):
        for x in range(w):
            values = np.array([image[:, clamp(y + dy * d, x + dx * d)[0], clamp(y + dy * d, x + dx * d)[1]]
                               for d in dilations for dy, dx in grid])  # (18, 3)
            sigma = values.std(axis=0, ddof=1)
            a = []
            for d in dilations:
                for dy, dx in ring:
                    ny, nx = clamp(y + dy * d, x + dx * d)
                    a.append(np.mean(-np.abs(image[:, y, x] - image[:, ny, nx]) / (1e-8 + 0.1 * sigma)))
            a = np.exp(np.array(a) - max(a))
            weights[:, y, x] = a / a.sum()
    current = logits.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(current)
        for y in range(h):
            for x in range(w):
                n = 0
                for d in dilations:
                    for dy, dx in ring:
                        ny, nx = clamp(y + dy * d, x + dx * d)
                        new[:, y, x] += weights[n, y, x] * current[:, ny, nx]
                        n += 1
        current = new
    return current


def pamr_stacked_reference(image: torch.Tensor, logits: torch.Tensor, iterations=10, dilations=(8, 16)):
    """PAMR with every neighbour stacked (the memory-hungry direct form), for whole images."""
    pad = max(dilations)
    h, w = logits.shape[-2:]

    def neighbours(t, with_centre):
        padded = F.pad(t[None], (pad,) * 4, mode="replicate")[0]
        offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if with_centre or (dy, dx) != (0, 0)]
        return torch.stack([padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets], 1)

    sigma = neighbours(image, True).std(dim=1, keepdim=True)  # (3, 1, H, W)
    a = -(image[:, None] - neighbours(image, False)).abs() / (1e-8 + 0.1 * sigma)
    a = torch.softmax(a.mean(dim=0), dim=0)  # (K, H, W)
    for _ in range(iterations):
        logits = (neighbours(logits, False) * a[None]).sum(dim=1)
    return logits


def _embed(visual, window):
    x = visual.conv1(window)
    rows, cols = x.shape[-2:]
    x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1)
    x = x + positional_embedding_reference(visual, rows, cols)
    return visual.ln_pre(x), (int(rows), int(cols))


def _project(visual, patches):
    x = visual.ln_post(patches) @ visual.proj
    return x / x.norm(dim=-1, keepdim=True)


#: SC-CLIP's blocks in ViT-B/16, from its authors' configs: hidden-state indices of the similarity,
#: post-aggregation and fusion (start, end) blocks, and the CLS weight.
SC_CLIP_B16 = (8, 3, 3, 10, 0.3)


def method_features_reference(visual, window: torch.Tensor, method: str, sc_clip=SC_CLIP_B16):
    """(1, 3, h, w) -> ((rows * cols, E) normalised patch features, grid), per the equations."""
    if method == "sclip":
        return image_features_reference(visual, window)
    x, (rows, cols) = _embed(visual, window)
    blocks = list(visual.transformer.resblocks)
    last = blocks[-1]
    if method != "sc-clip":
        for block in blocks[:-1]:
            x = block(x)
        bias = None
        if method == "naclip":
            bias = naclip_bias_reference(rows, cols)
        x = attention_reference(last.ln_1(x), last.attn, method, bias=bias)
        return _project(visual, x)[0, 1:], (rows, cols)

    hidden = []
    for block in blocks[:-1]:
        x = block(x)
        hidden.append(x)
    similarity_block, post_block, start, end, cls_weight = sc_clip
    x11, x9, x4 = hidden[-1], hidden[similarity_block], hidden[post_block]
    lof = torch.from_numpy(lof_reference(x11[0, 1:].double().numpy(), min(30, rows * cols - 1)))
    outliers = (lof > torch.quantile(lof, 0.95)).numpy()
    fix = lambda t: torch.from_numpy(repair_reference(t[0, 1:].numpy(), outliers, rows, cols))[None]  # noqa: E731
    f9 = fix(x9)
    f9 = f9 / f9.norm(dim=-1, keepdim=True)
    s = f9 @ f9.transpose(1, 2)
    cls = x11[:, :1]
    y = aggregate_reference(fix(x11), s)
    y = attention_reference(last.ln_1(y), last.attn, "scclip", similarity=s) + cls_weight * cls
    f4 = x4[:, 1:] / x4[:, 1:].norm(dim=-1, keepdim=True)
    s4 = f4 @ f4.transpose(1, 2)
    y = aggregate_reference(y, s4)
    r = sum(hidden[start:end])
    z = attention_reference(last.ln_1(r[:, 1:]), last.attn, "scclip", similarity=s) + cls_weight * r[:, :1]
    y = y + aggregate_reference(z, s4)
    return _project(visual, y)[0], (rows, cols)
