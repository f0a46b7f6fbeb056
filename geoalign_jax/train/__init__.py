"""The trainer: `python -m geoalign_jax.train --config configs/NAME.py --workdir DIR` (see __main__.py).

config.py (the trainer's config sections), optim.py (AdamW, masks, multipliers), state.py (TrainState and its
shardings, initial parameters), step.py (the jitted step), checkpoint.py (orbax + data iterator, preemption),
metrics.py (console, metrics.jsonl, TensorBoard, MFU), loop.py (the run).
"""
