"""The SCLIP engine: model loading, Correlative Self-Attention, text encoding and slide inference.

It knows nothing of napari.  Modules that need torch import it through :mod:`._torch`, which makes
the import safe inside a process that already runs Mesa's OpenGL (see that module).
"""
