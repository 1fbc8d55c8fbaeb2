"""Calling a user's model with other tensors in place of its parameters and buffers.

``torch.func.functional_call`` puts the given tensors into the model's slots (an entry of a module's
``_parameters`` or ``_buffers``) for the call and puts the originals back after it. With
``tie_weights=True``, its default, it swaps every *name* under which a tensor is reachable. A module
registered under two names (``self.b = self.a``, one block twice in a Sequential) has two names for
one slot: the second swap takes the first one's substitute for the original and puts it back last,
so the model is left holding a detached plain tensor instead of its Parameter (torch 2.14). Every
later call then differentiates a parameter the forward no longer uses: zero gradients, no error.

:func:`functional_call` swaps each slot once: it expands the given names to the distinct slots that
hold the same tensor (a Parameter shared by two modules sits in two slots, which both need the
substitute) and calls torch with ``tie_weights=False``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["functional_call", "slot_names", "split_params"]

Tensors = Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]


def slot_names(model: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """{name: the names of every distinct slot holding the same tensor}, for every name under which
    a parameter or buffer of ``model`` is reachable (``named_parameters(remove_duplicate=False)``
    and the same for buffers). A module reached under two names contributes its slots once, under
    the first name."""
    slots: Dict[int, List[str]] = {}  # id(tensor) -> slot names, in module order
    names: Dict[str, int] = {}  # every name -> id(tensor)
    seen = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        first_visit = id(module) not in seen
        seen.add(id(module))
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                names[name] = id(t)
                if first_visit:
                    slots.setdefault(id(t), []).append(name)
    return {name: tuple(slots[key]) for name, key in names.items()}


def functional_call(model: nn.Module, tensors: Tensors, args: Any = (), kwargs: Any = None,
                    slots: Dict[str, Tuple[str, ...]] = None) -> Any:
    """``model(*args, **kwargs)`` with ``tensors`` ({name: tensor}, or a sequence of such dicts) in
    place of the parameters and buffers of those names, each slot swapped once and restored
    after (the module docstring says why). ``slots``: :func:`slot_names` of the model, when the
    caller has it (a compiled function takes it as a constant); names it does not know are passed
    on as given."""
    if slots is None:
        slots = slot_names(model)
    merged: Dict[str, torch.Tensor] = {}
    for table in ([tensors] if isinstance(tensors, Mapping) else tensors):
        for name, t in table.items():
            for slot in slots.get(name, (name,)):
                if slot in merged and merged[slot] is not t:
                    raise ValueError(f"functional_call: '{name}' and another name given refer to the same tensor of "
                                     f"the model (slot '{slot}'), with different values; give it once")
                merged[slot] = t
    return torch.func.functional_call(model, merged, args, kwargs, tie_weights=False, strict=False)


def split_params(model: nn.Module) -> Tuple[List[str], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(names of the trainable parameters in ``model.parameters()`` order, {name: detached
    trainable parameter}, {name: every other parameter and buffer}): what :func:`functional_call`
    takes, the trainable ones to differentiate in."""
    names, trainable, fixed = [], {}, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.append(n)
            trainable[n] = p.detach()
        else:
            fixed[n] = p.detach()
    fixed.update({n: b for n, b in model.named_buffers()})
    return names, trainable, fixed
