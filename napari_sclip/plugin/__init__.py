"""The napari plugin: the SCLIP widget, its background worker, and label-layer bookkeeping.

Only :mod:`.widget` touches Qt; the other modules hold the logic (class numbering, edit tracking,
layer updates, the worker's job) so it can be tested without a window.  Nothing here imports
torch or open_clip: the engine is reached through :class:`napari_sclip.Segmenter`, lazily.
"""
