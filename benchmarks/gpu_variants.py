"""Ways to run SCLIP's vision tower faster on a GPU (issue 11, item 5), measured against the engine.

Each variant turns the engine's loaded ``visual`` tower into ``run(crops) -> features``: crops
``(B, 3, h, w)`` float32 on the device, SCLIP's patch features ``(B, rows, cols, E)`` float32.
All of them call the engine's own :func:`sclip_patch_features`, so they differ only in how the same
equations are executed:

- ``engine``: what the engine runs today: fp32 weights under fp16 autocast.
- ``half``: the authors' precision: OpenAI's fp16 weights (convolution, linear, attention and the
  projection in fp16; LayerNorm and the embeddings kept fp32), no autocast, so no weight casts
  and an fp16 residual stream.
- ``half+channels-last``: ``half`` with the patch convolution's input and weight channels-last.
- ``half+compile`` / ``engine+compile``: ``torch.compile`` (default mode, static shapes).
- ``half+cuda-graph``: ``half`` captured once per batch size as a CUDA graph and replayed.

``bench_batch.py windows --variants ...`` times them per batch size, and scores each variant's
patch labels against fp32's on the windows of real-looking photos; ``--profile`` shows where the
``engine`` variant's time goes by kernel kind.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

VARIANTS = ("engine", "half", "half+channels-last", "half+compile", "engine+compile", "half+cuda-graph")


def half_like_openai(visual):
    """A copy of ``visual`` with fp16 weights as OpenAI's CLIP keeps them on a GPU: every
    convolution, linear and attention weight and bias and the output projection in fp16;
    LayerNorms, the class and positional embeddings stay fp32 (the engine casts them to the
    tokens' dtype)."""
    import torch

    visual = copy.deepcopy(visual)
    for module in visual.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.half()
        elif isinstance(module, torch.nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias"):
                getattr(module, name).data = getattr(module, name).data.half()
    visual.proj.data = visual.proj.data.half()
    return visual


def build(variant: str, visual, batch: int, crop: tuple[int, int]) -> Callable:
    """``run(crops) -> features`` of one variant, for ``batch`` crops of ``crop`` pixels."""
    import torch

    from napari_sclip.engine import segmenter as engine
    from napari_sclip.engine.methods.sclip import sclip_patch_features

    if variant.startswith("engine"):
        def run(crops):
            with engine.autocast(crops.device):  # looked up here: bench_batch's --precision replaces it
                return sclip_patch_features(visual, crops)
    else:
        half = half_like_openai(visual)
        channels_last = variant == "half+channels-last"
        if channels_last:
            half.conv1.to(memory_format=torch.channels_last)

        def run(crops):
            crops = crops.half()
            if channels_last:
                crops = crops.contiguous(memory_format=torch.channels_last)
            return sclip_patch_features(half, crops)

    if variant.endswith("+compile"):
        return torch.compile(run, dynamic=False)
    if variant.endswith("+cuda-graph"):
        return cuda_graph(run, torch.zeros(batch, 3, *crop, device=next(visual.parameters()).device))
    return run


def cuda_graph(run: Callable, static_input) -> Callable:
    """``run`` captured once on ``static_input``'s shape; each call copies its input in and
    replays the graph (the output tensor is reused between calls)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm-up outside the capture: cuBLAS and SDPA pick their kernels
            run(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_output = run(static_input)

    def replay(crops):
        static_input.copy_(crops)
        graph.replay()
        return static_output

    return replay


def time_variant(run: Callable, crops, repeats: int, sync: Callable) -> dict:
    """Seconds of the first call (compilation, capture) and the best of ``repeats`` after it."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            run(crops)
            sync()
            times.append(time.perf_counter() - start)
    return {"first_s": times[0], "seconds": min(times[1:])}


def label_agreement(run: Callable, reference, crops, text, batch: int) -> float:
    """Fraction of patches whose best class (features @ text) equals the reference's."""
    import torch

    with torch.inference_mode():
        labels = []
        for start in range(0, len(crops), batch):
            chunk = crops[start : start + batch]
            padded = torch.cat([chunk, chunk[:1].expand(batch - len(chunk), -1, -1, -1)]) if len(chunk) < batch else chunk
            labels.append((run(padded)[: len(chunk)].float() @ text.T).argmax(-1).clone())
        return float((torch.cat(labels) == reference).float().mean())


def profile_by_kind(run: Callable, crops, steps: int = 5) -> list[tuple[str, float, float]]:
    """GPU kernel time of ``steps`` calls grouped by kind: ``(kind, ms per call, share)``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        run(crops)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run(crops)
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us:
            kind = kernel_kind(event.key)
            totals[kind] = totals.get(kind, 0.0) + device_us
    whole = sum(totals.values()) or 1.0
    return sorted(((kind, us / 1000 / steps, us / whole) for kind, us in totals.items()), key=lambda row: -row[1])


def kernel_kind(name: str) -> str:
    """A coarse kind for a CUDA kernel's name."""
    lowered = name.lower()
    for kind, marks in (
        ("attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
        ("matrix products", ("gemm", "sm90", "cutlass", "cublas", "xmma", "matmul")),
        ("layer norm", ("layer_norm", "layernorm")),
        ("softmax", ("softmax",)),
        ("convolution", ("conv", "implicit")),
        ("copies and casts", ("copy", "cast", "memcpy", "memset", "to_copy", "cat")),
        ("element-wise", ("elementwise", "vectorized", "unrolled", "silu", "gelu", "add", "mul", "div")),
        ("reductions", ("reduce", "norm")),
        ("interpolation", ("upsample", "interp")),
    ):
        if any(mark in lowered for mark in marks):
            return kind
    return "other"
