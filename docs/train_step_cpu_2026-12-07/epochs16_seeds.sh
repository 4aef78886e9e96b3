#!/usr/bin/env bash
# The default job (configs/synthetic.py) with 16 epochs instead of 10, seeds 0 / 1 / 2, on the
# demo's data (runs/demo11/data): does more training make the map's pointing less of a draw?
cd "$(dirname "$0")/../.."
for s in 0 1 2; do
  uptime > runs/cls_e16_seed$s.log
  /usr/bin/time -f "%e s wall" .venv/bin/python -m mskjax.train --config configs/synthetic.py \
    --workdir runs/cls_e16_seed$s --config.data.root=runs/demo11/data --config.seed=$s \
    --config.train.epochs=16 >> runs/cls_e16_seed$s.log 2>&1
  uptime >> runs/cls_e16_seed$s.log
done
