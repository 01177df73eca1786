"""The pseudo-label dataset format: a split-first folder of images and 8-bit index masks that
common trainers read as is (Hugging Face ``datasets`` imagefolder, MMSegmentation, Detectron2,
torchvision-style loaders), with a manifest that records where every label came from.

This package sits on top of the engine and knows nothing of napari.
"""
