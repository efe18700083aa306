"""conchdb: a searchable vector database of tissue.

Whole-slide images are cut into tiles at a true physical resolution, embedded with CONCH
into its 512-d image-text space, and stored in Qdrant with their metadata, so that tissue
can be searched by text, by image, or by another stored tile.
"""

__version__ = "0.1.0"
