"""Bring your own features: TRIDENT and CLAM CONCH v1 feature files in, TRIDENT files out.

`files` reads and writes the tools' layouts, `importer` projects imported features into a
store through the ingest pipeline's records, `export` writes stored tiles back out for MIL.
"""
