#!/usr/bin/env bash
# The default job (configs/synthetic.py, flips and shifts) with seeds 1 and 2 after the 2026-12-07
# trainer change (convolutions on Eigen, closed-form BatchNorm backward): seed 0 is the demo's
# classifier stage and the default job itself. Same data as the demo (runs/demo11/data).
cd "$(dirname "$0")/../.."
for s in 1 2; do
  uptime > runs/cls_eigen_seed$s.log
  /usr/bin/time -f "%e s wall" .venv/bin/python -m mskjax.train --config configs/synthetic.py \
    --workdir runs/cls_eigen_seed$s --config.data.root=runs/demo11/data --config.seed=$s \
    >> runs/cls_eigen_seed$s.log 2>&1
  uptime >> runs/cls_eigen_seed$s.log
done
