"""From slide files to tiles, and (in `pipeline`) on to vectors in the store.

One job per module: `cohort` finds slides and gives them ids, `manifest` joins a CSV of
per-slide metadata, `slide` opens a slide or image, `mpp` decides its pixel size, `tissue`
finds the tissue, `grid` chooses the tiles, `reader` reads them in worker processes, `qc`
draws the picture to check, `pyramid` writes pyramidal TIFFs. Only `pipeline` knows the
model and the store. Nothing is imported here, so worker processes that import the reader
do not load scikit-image or torch.
"""
