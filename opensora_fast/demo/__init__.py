"""``python -m opensora_fast demo``: an Open-Sora-shaped training and sampling loop
run through the upstream-faithful references and through opensora_fast, side by
side (see :mod:`opensora_fast.demo.loop`). Needs tqdm; matplotlib for the chart,
PyAV or Pillow for the sample video."""
