# The conchdb image: a CUDA runtime, Python, and conchdb with its dependencies.
# docker-compose.yml runs it as the GPU workers (docker/gpu-workers.sh: one `conchdb worker` per
# GPU), as the API (`conchdb serve`), and for `conchdb ingest`.
# PyTorch's Linux wheels carry their own CUDA libraries; the base image gives the
# container what the NVIDIA runtime needs to expose the host driver.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/conchdb
ENV PATH=/opt/conchdb/bin:$PATH

# Dependencies first, so a change to the code does not reinstall PyTorch.
RUN pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY conchdb ./conchdb
RUN pip install .
COPY docker/gpu-workers.sh /usr/local/bin/conchdb-gpu-workers

RUN useradd --create-home --uid 1000 conchdb && mkdir -p /data/conchdb && chown conchdb /data/conchdb
USER conchdb
ENV CONCHDB_HOME=/data/conchdb
WORKDIR /home/conchdb

CMD ["conchdb", "worker"]
