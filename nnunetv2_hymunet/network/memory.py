"""What a forward pass keeps for backward, measured: the activation memory of a training step without its noise."""

from typing import Callable, Dict, Optional

import torch
from torch import nn


def saved_for_backward_bytes(
    network: nn.Module, *inputs: torch.Tensor, label: Optional[Callable[[], str]] = None
) -> Dict[str, int]:
    """{label: bytes} of the tensors autograd saves for backward during one forward pass of `network` (train mode).

    Each storage is counted once (views and tensors saved by several ops share it), in full, under `label()` at the
    moment it is first saved (default: one label, "total"); parameters are not counted. Tensors that checkpointed or
    recomputing code does not keep are not seen, as they are not kept. The outputs are dropped before returning.
    """
    params = {p.untyped_storage().data_ptr() for p in network.parameters()}
    seen, per_label = set(), {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and storage.nbytes():
            seen.add(key)
            name = label() if label is not None else "total"
            per_label[name] = per_label.get(name, 0) + storage.nbytes()
        return t

    network.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = network(*inputs)
    del out
    return per_label
