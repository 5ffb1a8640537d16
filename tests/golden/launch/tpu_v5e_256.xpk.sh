xpk workload create \
  --cluster=tpu-cluster \
  --workload=llm-run \
  --tpu-type=v5litepod-16x16 \
  --num-slices=1 \
  --docker-image=us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 \
  '--command=axmini train --trainer.max_step=100 --mesh_selector=tpu-v5e-256' \
  --priority=high \
  --max-restarts=0 \
  --project=my-proj \
  --zone=us-east5-a \
  --env AXMINI_DISTRIBUTED=auto
