"""From slide files to vectors in the store.

One job per module: `cohort` finds slides and gives them ids, `manifest` joins a CSV of
per-slide metadata, `pipeline` tiles, embeds and stores them; the pixels come from
`conchdb.slides`. Only `pipeline` knows the model and the store. Nothing is imported here,
so a process that needs only cohort discovery does not load torch.
"""
