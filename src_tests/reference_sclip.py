"""A plain, per-window fp32 rendering of SCLIP, written straight from the paper and the authors'
protocol notes, for checking the engine against (and for the benchmark's baseline).

Nothing here is shared with the engine: every step uses the most direct torch call (explicit
attention matrices, full 77-token text encoding, ``F.interpolate`` for every resize, one window
at a time, a full-size ``(N, H, W)`` logit tensor).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
STD = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)


def csa_reference(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """out_proj((softmax(q qᵀ s) + softmax(k kᵀ s)) v), head by head, with explicit matrices."""
    batch, tokens, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    scale = head_dim**-0.5
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        qh, kh, vh = q[..., part], k[..., part], v[..., part]
        attention = torch.softmax(qh @ qh.transpose(1, 2) * scale, dim=-1) + torch.softmax(
            kh @ kh.transpose(1, 2) * scale, dim=-1
        )
        outputs.append(attention @ vh)
    return attn.out_proj(torch.cat(outputs, dim=-1))


def positional_embedding_reference(visual, rows: int, cols: int) -> torch.Tensor:
    pos = visual.positional_embedding
    g = visual.grid_size[0]
    if (rows, cols) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode="bicubic")
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])


def image_features_reference(visual, window: torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) -> (rows * cols, E) normalised patch features, with the last block spelt out."""
    x = visual.conv1(window)
    rows, cols = x.shape[-2:]
    x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1)
    x = x + positional_embedding_reference(visual, rows, cols)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    x = x + csa_reference(last.ln_1(x), last.attn)
    x = x + last.mlp(last.ln_2(x))
    x = visual.ln_post(x) @ visual.proj
    x = x / x.norm(dim=-1, keepdim=True)
    return x[0, 1:], (rows, cols)


def text_features_reference(clip, tokenizer, names: list[str], templates: list[str]) -> torch.Tensor:
    """Per name: full-length encode_text of every template, normalise, mean, normalise."""
    features = []
    for name in names:
        emb = clip.encode_text(tokenizer([t.format(name) for t in templates]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        features.append(mean / mean.norm())
    return torch.stack(features)


def preprocess_reference(rgb: np.ndarray, short_side: int) -> torch.Tensor:
    h, w = rgb.shape[:2]
    scale = min(2048 / max(h, w), short_side / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    x = torch.floor(x + 0.5).clamp(0, 255)
    return (x - MEAN) / STD


@torch.no_grad()
def sclip_reference(
    clip,
    text_features: torch.Tensor,
    name_class: list[int],
    rgb: np.ndarray,
    short_side=336,
    window=224,
    stride=112,
    logit_scale=40.0,
    prob_threshold=0.0,
    features=image_features_reference,
    refine=None,
):
    """Returns (labels, confidence, class_probs) as numpy arrays.

    ``features(visual, crop)`` gives a window's patch features (SCLIP's by default);
    ``refine(image, logits)`` refines the full-size logits with the resized image (PAMR).
    """
    image = preprocess_reference(rgb, short_side)
    _, _, h, w = image.shape
    num_names = text_features.shape[0]
    preds = torch.zeros(1, num_names, h, w)
    counts = torch.zeros(1, 1, h, w)
    rows = max(h - window + stride - 1, 0) // stride + 1
    cols = max(w - window + stride - 1, 0) // stride + 1
    for i in range(rows):
        for j in range(cols):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + window, h), min(x1 + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            crop = image[:, :, y1:y2, x1:x2]
            patch_features, (gh, gw) = features(clip.visual, crop)
            logits = (patch_features @ text_features.T).T.reshape(1, num_names, gh, gw)
            logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)
            preds += F.pad(logits, (x1, w - x2, y1, h - y2))
            counts[:, :, y1:y2, x1:x2] += 1
    preds = preds / counts
    logits = F.interpolate(preds, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    if refine is not None:
        resized = F.interpolate(image, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
        logits = refine(resized, logits)
    probs = torch.softmax(logits * logit_scale, dim=0)
    num_classes = max(name_class) + 1
    one_hot = F.one_hot(torch.tensor(name_class), num_classes).T.reshape(num_classes, num_names, 1, 1)
    class_probs = (probs[None] * one_hot).max(dim=1)[0]
    confidence, labels = class_probs.max(dim=0)
    labels = labels + 1
    labels[confidence < prob_threshold] = 0
    return labels.numpy(), confidence.numpy(), class_probs.numpy()
