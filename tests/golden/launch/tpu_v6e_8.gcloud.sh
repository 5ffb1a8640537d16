#!/usr/bin/env bash
# llm-run: 1 x tpu-v6e-8 (per slice: 1 x 8-chip hosts) on Cloud TPU queued resources.
set -euo pipefail

gcloud alpha compute tpus queued-resources create llm-run \
  --zone=us-east5-a \
  --project=my-proj \
  --accelerator-type=v6e-8 \
  --runtime-version=v2-alpha-tpuv6e \
  --node-id=llm-run \
  --reservation=my-res

while true; do
  state=$(gcloud compute tpus queued-resources describe llm-run --zone=us-east5-a --project=my-proj '--format=value(state.state)')
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "queued resource llm-run is $state" >&2; exit 1 ;;
  esac
  echo "waiting for queued resource llm-run (state: ${state:-unknown})"
  sleep 30
done

pids=()
for node in llm-run; do
  gcloud compute tpus tpu-vm ssh "$node" --zone=us-east5-a --project=my-proj --worker=all '--command=sudo gcloud auth configure-docker us-docker.pkg.dev --quiet && sudo docker run --rm --privileged --network=host -e AXMINI_DISTRIBUTED=auto us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 axmini train --trainer.max_step=100 --mesh_selector=tpu-v6e-8' &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
