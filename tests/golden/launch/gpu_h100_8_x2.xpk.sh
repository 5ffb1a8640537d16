xpk workload create \
  --cluster=tpu-cluster \
  --workload=llm-run \
  --device-type=h100-80gb-8 \
  --num-nodes=2 \
  --docker-image=us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 \
  '--command=axmini train --trainer.max_step=100 --mesh_selector=gpu-h100-8' \
  --priority=medium \
  --max-restarts=1 \
  --project=my-proj \
  --zone=us-east5-a \
  --env 'AXMINI_COORDINATOR=$(JAX_COORDINATOR_ADDRESS):$(JAX_COORDINATOR_PORT)' \
  --env 'AXMINI_PROCESS_ID=$(NODE_RANK)' \
  --env AXMINI_NUM_PROCESSES=2
