"""The engine: training one model, whatever the method.

* :mod:`pat.engine.loop`: ``fit``, the one training loop; :mod:`pat.engine.callbacks` its hooks;
* :mod:`pat.engine.steps` and :mod:`pat.engine.sam`: per-batch update rules (SGD, SAM, ...);
* :mod:`pat.engine.optim` and :mod:`pat.engine.schedules`: optimizers and LR policies by name;
* :mod:`pat.engine.masking`: keeping a child's masked weights at zero while it trains;
* :mod:`pat.engine.batchnorm`: BatchNorm statistics recomputed on data;
* :mod:`pat.engine.checkpoint`, :mod:`pat.engine.cost`, :mod:`pat.engine.resources`,
  :mod:`pat.engine.distributed`: safe checkpoints, what training cost, refusing what cannot
  fit, and torchrun ranks.
"""
