"""Training: one command, one loop, two kinds of model.

    python -m mskjax.train --config configs/synthetic.py --workdir runs/synthetic [--config.a.b=v ...]

__main__.py   the command line: config overrides checked against the config file, dispatch on `kind`
config.py     base configurations (classifier, SAM) and their validation
loop.py       the one training loop (resume, non-finite stop, logging, evaluation, best export, checkpoints)
classifier.py classifier training (kind "classifier"): steps, evaluation, export
sam.py        box-prompted SAM training (kind "sam"), sam_data.py its examples
optim.py      optimizers and schedules; run_checkpoints.py Orbax run checkpoints

Nothing outside this package imports it; it imports the library below it.
"""
