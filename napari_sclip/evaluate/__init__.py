"""Scoring pseudo-labels against ground truth (no napari)."""
