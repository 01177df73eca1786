"""Ready-made model choices: general CLIPs and CLIPs trained on biology, histopathology and
remote-sensing images.  A preset's key works wherever a model name does (``Segmenter(model=
"bioclip")``, ``--model bioclip``, the widget's picker); ``napari-sclip models`` lists them.

Sizes are the fp32 weights (parameters x 4 bytes), what the download and the model in memory
take.  Each preset's activation is what its authors' own loading code builds: OpenAI's weights
and weights fine-tuned inside OpenAI's model use QuickGELU; RemoteCLIP's loading code builds
open_clip's plain (GELU) config; a Hugging Face repo's config decides for itself, as in open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A named model choice.

    Attributes
    ----------
    key
        What to type (``--model KEY``); lower case, never an open_clip model name.
    title, description
        A short name and one line for menus.
    domain
        ``"general"``, ``"biology"``, ``"histopathology"`` or ``"remote sensing"``.
    model, pretrained
        What the key stands for (:mod:`~napari_sclip.engine.sources`).
    quick_gelu
        The activation, where the preset decides it (``None``: the weights or config do).
    size_mb
        The fp32 weights, in MB (10⁶ bytes).
    terms
        What a user must do or accept before the download works, or ``""``.
    like
        For a Hugging Face repo, the open_clip config of the same architecture (for sizes and
        memory estimates before its own config is downloaded).
    """

    key: str
    title: str
    description: str
    domain: str
    model: str
    pretrained: str | None
    quick_gelu: bool | None
    size_mb: int
    terms: str = ""
    like: str = ""

    @property
    def architecture(self) -> str:
        """An open_clip config name with this preset's architecture."""
        return self.like or self.model


PRESETS: dict[str, Preset] = {
    preset.key: preset
    for preset in (
        Preset("openai-b16", "OpenAI ViT-B/16", "CLIP ViT-B/16: the papers' backbone; the default",
               "general", "ViT-B-16", "openai", True, 598),
        Preset("openai-b32", "OpenAI ViT-B/32", "CLIP ViT-B/32: about 3.5x faster than B/16, coarser masks",
               "general", "ViT-B-32", "openai", True, 605),
        Preset("openai-l14", "OpenAI ViT-L/14", "CLIP ViT-L/14: finer masks, about 4.5x slower than B/16",
               "general", "ViT-L-14", "openai", True, 1710),
        Preset("openai-l14-336", "OpenAI ViT-L/14-336", "CLIP ViT-L/14 trained at 336 px",
               "general", "ViT-L-14-336", "openai", True, 1712),
        Preset("bioclip", "BioCLIP (ViT-B/16)", "Organisms across the tree of life (TreeOfLife-10M)",
               "biology", "hf-hub:imageomics/bioclip", None, None, 598, like="ViT-B-16"),
        Preset("quiltnet-b16", "QuiltNet ViT-B/16", "Histopathology (Quilt-1M)",
               "histopathology", "hf-hub:wisdomik/QuiltNet-B-16", None, None, 598,
               "research use only; if Hugging Face asks, accept the terms on the repo's page while logged in",
               like="ViT-B-16"),
        Preset("quiltnet-b32", "QuiltNet ViT-B/32", "Histopathology (Quilt-1M), faster",
               "histopathology", "hf-hub:wisdomik/QuiltNet-B-32", None, None, 605,
               "research use only; if Hugging Face asks, accept the terms on the repo's page while logged in",
               like="ViT-B-32"),
        Preset("remoteclip-b32", "RemoteCLIP ViT-B/32", "Aerial and satellite scenes",
               "remote sensing", "ViT-B-32", "hf-hub:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt", False, 605),
        Preset("remoteclip-l14", "RemoteCLIP ViT-L/14", "Aerial and satellite scenes, larger",
               "remote sensing", "ViT-L-14", "hf-hub:chendelong/RemoteCLIP/RemoteCLIP-ViT-L-14.pt", False, 1710),
        Preset("georsclip-b32", "GeoRSCLIP ViT-B/32", "Remote sensing (RS5M)",
               "remote sensing", "ViT-B-32", "hf-hub:Zilun/GeoRSCLIP/ckpt/RS5M_ViT-B-32.pt", True, 605),
        Preset("georsclip-l14", "GeoRSCLIP ViT-L/14", "Remote sensing (RS5M), larger",
               "remote sensing", "ViT-L-14", "hf-hub:Zilun/GeoRSCLIP/ckpt/RS5M_ViT-L-14.pt", True, 1710),
        Preset("georsclip-h14", "GeoRSCLIP ViT-H/14", "Remote sensing (RS5M), largest",
               "remote sensing", "ViT-H-14", "hf-hub:Zilun/GeoRSCLIP/ckpt/RS5M_ViT-H-14.pt", False, 3944),
    )
}
DEFAULT_PRESET = "openai-b16"


def find_preset(name: str | None) -> Preset | None:
    """The preset called ``name`` (case-insensitive), or ``None``."""
    return PRESETS.get(str(name or "").strip().lower())


def preset_for(model: str, pretrained: str | None) -> Preset | None:
    """The preset that ``model`` and ``pretrained`` name, either by key or spelt out."""
    found = find_preset(model)
    if found is not None:
        return found if pretrained in (None, "", found.pretrained) else None
    return next((p for p in PRESETS.values() if (p.model, p.pretrained or None) == (model, pretrained or None)), None)
