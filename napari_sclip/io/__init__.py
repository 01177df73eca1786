"""Reading images and writing label maps; no torch, no napari."""
