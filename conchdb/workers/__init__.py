"""Distributed ingest: Celery workers on a Redis broker run the pipeline's per-slide code.

`conchdb worker` starts a worker (`worker.run_worker`); `conchdb ingest --broker` sends
the slides to the workers (`dispatch.BrokerIngest`); `conchdb workers status` reads what
they are doing (`status.workers_status`). Importing this package loads nothing heavy;
each module imports Celery, Redis or the model only where it needs them.
"""
