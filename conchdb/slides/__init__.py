"""Slide pixels: opening a slide or image, its pixel size, tissue, tile grid, the tile reader,
QC pictures and pyramidal TIFFs. Knows no model, store, search or ingest."""
