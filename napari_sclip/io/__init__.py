"""Reading image files; no torch, no napari."""
