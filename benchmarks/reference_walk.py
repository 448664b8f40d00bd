"""The layer-0 "catcher" of the authors' GPTQ / SparseGPT / Wanda drivers, shared by this folder's
reference implementations (not by labkit, whose own walk is labkit.walk.calibration_walk)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@torch.no_grad()
def catch_layer0_inputs(model, calibration: torch.Tensor, dev) -> tuple[list, list]:
    """Run each calibration sample [1, seqlen] until decoder layer 0 and keep what it receives:
    (hidden states [1, seqlen, hidden] per sample, the keyword arguments of each call)."""
    layers = model.model.layers
    inps, kwargs = [], []

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kw):
            inps.append(inp)
            kwargs.append(kw)
            raise ValueError  # stop the forward pass here

    layers[0] = Catcher(layers[0])
    for j in range(calibration.shape[0]):
        with contextlib.suppress(ValueError):
            model(calibration[j : j + 1].to(dev), use_cache=False)
    layers[0] = layers[0].module
    return inps, kwargs
