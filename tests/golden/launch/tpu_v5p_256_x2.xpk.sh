xpk workload create \
  --cluster=tpu-cluster \
  --workload=llm-run \
  --tpu-type=v5p-4x4x8 \
  --num-slices=2 \
  --docker-image=us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 \
  '--command=axmini train --trainer.max_step=100 --mesh_selector=tpu-v5p-256' \
  --priority=medium \
  --max-restarts=3 \
  --project=my-proj \
  --zone=us-east5-a \
  --spot \
  --env AXMINI_DISTRIBUTED=auto \
  --env 'RUN=a b'
