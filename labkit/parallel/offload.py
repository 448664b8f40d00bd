"""Offloading: run a model whose decoder layers do not stay on the compute device.

The embedding, the final norm and the output layer stay on the device; each decoder layer lives
elsewhere, in CPU memory (pinned, for fast copies to a GPU) or on disk (one safetensors file per
layer, read through a memory map), and comes to the device only while it runs:

    for each layer i:   wait for layer i's weights  ->  start loading layer i+1 (background thread)
                        ->  run layer i  ->  drop its weights

With prefetch, loading layer i+1 overlaps computing layer i, so two layers are on the device at
a time and the run takes about max(compute, load) per layer instead of their sum. Every token
generated moves all the decoder weights once: offloading trades speed for memory, and pays off
when the work per layer is large (long prompts, big batches) or when the model does not fit at all.
(FlexGen, Sheng et al., 2023, and DeepSpeed ZeRO-Inference schedule the same idea at scale.)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..models import check_llama
from . import store


class Prefetcher:
    """Loads layers' weights to the device, at most one ahead, on one background thread."""

    def __init__(self, load, num_layers: int, device, prefetch: bool = True):
        self.load, self.num_layers, self.device, self.prefetch = load, num_layers, torch.device(device), prefetch
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-prefetch") if prefetch else None
        self.loads = 0  # layers loaded so far (each a full copy of the layer's weights)
        self.bytes_in_flight = self.peak_bytes_in_flight = 0  # fetched layer weights alive at once
        self.lock = threading.Lock()
        # On a GPU the copies run on a side stream, so that they overlap the compute stream's work.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                weights = self.load(index, self.device)
            self.stream.synchronize()  # this thread waits; the compute stream does not
        else:
            weights = self.load(index, self.device)
        with self.lock:
            self.loads += 1
            self.bytes_in_flight += _nbytes(weights)
            self.peak_bytes_in_flight = max(self.peak_bytes_in_flight, self.bytes_in_flight)
        return weights

    def release(self, weights: dict[str, torch.Tensor]) -> None:
        """The caller is done with a layer's weights (they are freed when it drops them)."""
        with self.lock:
            self.bytes_in_flight -= _nbytes(weights)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights on the device; then start loading the next layer."""
        future = self.pending.pop(index, None)
        weights = future.result() if future is not None else self._load(index)
        if self.device.type == "cuda":
            for t in weights.values():
                t.record_stream(torch.cuda.current_stream(self.device))  # made on the side stream
        if self.prefetch:
            following = (index + 1) % self.num_layers  # after the last layer: layer 0 of the next step
            if following not in self.pending:
                self.pending[following] = self.pool.submit(self._load, following)
        return weights

    def close(self) -> None:
        for future in self.pending.values():
            if not future.cancel():
                self.release(future.result())
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class OffloadedLayer(nn.Module):
    """Stands in for one decoder layer: holds no weights, fetches them for each call."""

    def __init__(self, layer: nn.Module, index: int, prefetcher: Prefetcher):
        super().__init__()
        layer.to("meta")  # the structure stays, the weights go (their memory is released)
        object.__setattr__(self, "layer", layer)  # not registered: not one of the model's parameters
        self.index, self.prefetcher = index, prefetcher

    def forward(self, hidden_states, *args, **kwargs):
        weights = self.prefetcher.get(self.index)
        try:
            return functional_call(self.layer, weights, (hidden_states, *args), kwargs)
        finally:
            self.prefetcher.release(weights)

    def extra_repr(self):
        return f"decoder layer {self.index}, weights fetched per call"


def _nbytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def _pinned(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu", copy=True)
    return t.pin_memory() if torch.cuda.is_available() else t


def offload(model, folder=None, device=None, prefetch: bool = True):
    """Offload the decoder layers of `model` in place; returns it.

    folder=None: the layers' weights are kept in CPU memory (pinned when CUDA is available) and
    copied to `device` per use. A folder: the model is written there (labkit.parallel.write_folder)
    and every use reads the layer's file. device: where the layers run (default: where the
    embedding is; the embedding, final norm and output layer are moved there).
    Call `model.offload_prefetcher.close()` when done to stop the background thread.
    """
    check_llama(model, "labkit.parallel.offload")
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    layers = model.model.layers
    if any(isinstance(layer, OffloadedLayer) for layer in layers):
        raise ValueError("model is already offloaded: offload a fresh copy (labkit.models.load).")
    if folder is not None:
        folder = store.write_folder(model, folder)  # ValueError if not writable
        load = _folder_loader(folder)
    else:
        kept = [{k: _pinned(v) for k, v in layer.state_dict().items()} for layer in layers]
        load = lambda index, dev: {k: v.to(dev, non_blocking=True) for k, v in kept[index].items()}
    return _install(model, load, device, prefetch)


def load_offloaded(folder, device="cpu", prefetch: bool = True):
    """A model whose layers stay in `folder` (written by write_folder): only the embedding, final
    norm and output layer are read into memory, so it runs a model larger than the device."""
    store.check_folder(folder)
    model = store.skeleton(store.read_config(folder))
    store.load_rest(model, folder, device)
    return _install(model, _folder_loader(Path(folder)), torch.device(device), prefetch)


def _folder_loader(folder: Path):
    for index in range(store.read_config(folder).num_hidden_layers):
        store.check_file(store.layer_file(folder, index))  # a truncated file: an error now, not mid-run

    def load(index, device):
        return store.read_tensors(store.layer_file(folder, index), device)

    return load


def _install(model, load, device, prefetch):
    layers = model.model.layers
    prefetcher = Prefetcher(load, len(layers), device, prefetch)
    for index in range(len(layers)):
        layers[index] = OffloadedLayer(layers[index], index, prefetcher)
    model.to(device)  # what stays: embedding, final norm, output layer, rotary frequencies
    model.offload_prefetcher = prefetcher
    return model
