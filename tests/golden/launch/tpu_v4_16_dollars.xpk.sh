xpk workload create \
  --cluster=tpu-cluster \
  --workload=llm-run \
  --tpu-type=v4-2x2x2 \
  --num-slices=1 \
  --docker-image=us-docker.pkg.dev/my-proj/axmini/axmini:2026.11 \
  '--command=axmini train '"'"'--set=run_name=run-$$(RUN_ID)-$$$$-it'"'"'"'"'"'"'"'"'s'"'"' --trainer.max_step=100 --mesh_selector=tpu-v4-16' \
  --priority=medium \
  --max-restarts=0 \
  --project=my-proj \
  --zone=us-east5-a \
  --env AXMINI_DISTRIBUTED=auto \
  --env 'NOTE=$$(HOME) costs $$5; $$$$ too'
