xpk workload create \
  --cluster=tpu-cluster \
  --workload=llm-run \
  --tpu-type=v6e-2x4 \
  --num-slices=1 \
  --docker-image=us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 \
  '--command=axmini train --trainer.max_step=100 --mesh_selector=tpu-v6e-8' \
  --priority=medium \
  --max-restarts=0 \
  --project=my-proj \
  --zone=us-east5-a \
  --reservation=my-res \
  --env AXMINI_DISTRIBUTED=auto
