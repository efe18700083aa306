#!/usr/bin/env bash
# The worker container's command: one `conchdb worker` process per GPU, each on its own GPU.
#
# Why one container runs them all: Docker gives every replica of a scaled service the same
# first GPUs (a reservation of one GPU is GPU 0 in each) and Compose cannot tell a replica
# its index, so `docker compose up --scale` cannot spread workers over GPUs. The container
# sees the host's GPUs instead, and this starts a worker on each of the first $GPUS of them.
#
#   GPUS=N    (default 1) workers on cuda:0 .. cuda:N-1
#   GPUS=all  a worker on every GPU the container sees
# Arguments are passed to every worker (e.g. --batch-size 64).
#
# Stopping: SIGTERM or SIGINT (`docker compose stop`) is passed to every worker, and each
# finishes the slide it holds before it exits. A worker that exits by itself (weights
# missing, broker gone) stops the others the same way, and the container exits with that
# worker's status, so that the restart policy starts them all again and the failure shows.
set -uo pipefail

# The signal handler comes first: as a container's PID 1, bash ignores a SIGTERM it does not
# handle, and `docker compose stop` would wait out the whole grace period.
stopping=0
pids=()
stop() {
    (( stopping )) && return   # once: a worker told twice would log and act on it twice
    stopping=1
    if (( ${#pids[@]} )); then kill -TERM "${pids[@]}" 2>/dev/null; fi
}
trap stop TERM INT

fail() {
    echo "conchdb-gpu-workers: $1" >&2
    exit 2
}

wanted=${GPUS:-1}
if [[ $wanted != all && ! $wanted =~ ^[1-9][0-9]*$ ]]; then
    fail "GPUS='$wanted' is not a number of GPUs: set GPUS to a whole number from 1 (e.g. GPUS=2), or GPUS=all"
fi
visible=$(python3 -c 'import torch; print(torch.cuda.device_count())') \
    || fail "could not count the GPUs with PyTorch (its error is above)"
if (( visible < 1 )); then
    fail "no GPU is visible in this container: install the NVIDIA Container Toolkit on the host \
(\`docker run --rm --gpus all ubuntu nvidia-smi\` must list the GPUs), or start only \
qdrant, redis and api on a host without GPUs"
fi
if [[ $wanted == all ]]; then
    wanted=$visible
elif (( wanted > visible )); then
    fail "GPUS=$wanted but this container sees $visible GPU(s): set GPUS to $visible or fewer, or GPUS=all"
fi

for ((gpu = 0; gpu < wanted && !stopping; gpu++)); do
    conchdb worker --device "cuda:$gpu" --concurrency 1 "$@" &
    pids+=("$!")
done
(( stopping )) || echo "conchdb-gpu-workers: ${#pids[@]} worker(s), on cuda:0 to cuda:$((${#pids[@]} - 1)) of $visible GPU(s)" >&2

status=143  # stopped by a signal before any worker exited
if (( !stopping )); then
    wait -n   # the first worker to exit, or a signal (the trap has then passed it on)
    status=$?
fi
stop
until wait; do :; done   # every worker finishes the slide it holds (a second signal does not cut that short)
exit "$status"
