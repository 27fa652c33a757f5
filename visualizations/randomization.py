"""Cascading parameter randomization: which layers make up each step, and re-initializing them.

Adebayo et al. (2018), "Sanity Checks for Saliency Maps", https://arxiv.org/abs/1810.03292,
randomize a trained network's weights block by block from the logits down to the input (17
blocks of Inception v3). :func:`randomization_steps` finds such blocks in any ``nn.Module``:

* The model's modules that hold parameters are grouped by the module tree, one level at a
  time: the top-level children first; then, as long as the number of groups stays at most
  ``max_steps`` (default ``MAX_STEPS`` = 24), every group that has parameterized children is
  replaced by those children -- all of one level together, so every step has the same
  granularity. ResNet-50 gives 19 steps (fc, its 16 bottleneck blocks, bn1, conv1), the demo's
  EfficientNet-Lite0 21 (_fc, _bn1, _conv_head, its 16 MBConv blocks, _bn0, _conv_stem), a
  small Sequential CNN one step per layer. Parameters a container holds itself (a ViT's class
  token) are a step of their own, named after the parameters. If even the top level has more
  than ``max_steps`` groups (a flat Sequential), neighbours are merged into contiguous runs.
  ``max_steps=None`` gives one step per parameterized module ("every layer").
* Steps are ordered from the output back to the input by when each group first runs in a
  probe forward pass (not by registration order, which need not follow the data flow).
  Groups that never run (Inception's auxiliary head in eval mode) come first: randomizing
  them changes nothing, which their step then shows.

:func:`reinitialize` re-draws a step's parameters the way torch initializes them: each module's
own ``reset_parameters()`` (``_reset_parameters()`` for ``nn.MultiheadAttention``), which for
batch norm also resets the running statistics. A module with parameters but neither method
(e.g. a custom ``nn.Parameter`` such as a class token) gets the documented fallback: each such
parameter is redrawn from a normal distribution with the trained tensor's own mean and standard
deviation (its scale survives, everything it learned does not; a one-element tensor keeps its
value). Seeded, so the same model gives the same randomized networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_STEPS = 24


@dataclass(frozen=True)
class RandomizationStep:
    """One step: ``name`` as shown to users, and the parts re-initialized -- (qualified module
    name, whole subtree?) pairs; ``False`` means only the module's own parameters."""

    name: str
    parts: tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class _Group:
    name: str          # qualified module name ("" = the model itself)
    subtree: bool      # the whole subtree, or only the module's own parameters
    position: int      # first call in the probe forward pass


def _has_own_parameters(module: "torch.nn.Module") -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _has_parameters(module: "torch.nn.Module") -> bool:
    return any(True for _ in module.parameters())


def call_order(module: "torch.nn.Module", sample: "torch.Tensor") -> dict[str, int]:
    """Each submodule's first call in one forward pass of ``sample`` (0 = the model itself);
    modules that never run get a number after all the others."""
    import torch

    first_call: dict[str, int] = {}
    handles = []

    def recorder(name: str):
        def hook(_module: object, _inputs: object) -> None:
            first_call.setdefault(name, len(first_call))
        return hook

    try:
        for name, submodule in module.named_modules():
            handles.append(submodule.register_forward_pre_hook(recorder(name)))
        with torch.inference_mode():
            module(sample)
    finally:
        for handle in handles:
            handle.remove()
    never_ran = len(handles)      # after every module that ran: first in top-down order
    return {name: first_call.get(name, never_ran) for name, _ in module.named_modules()}


def _children_groups(module: "torch.nn.Module", group: _Group,
                     order: dict[str, int]) -> list[_Group]:
    """A subtree group split into its own parameters and its parameterized children."""
    prefix = f"{group.name}." if group.name else ""
    parent = module.get_submodule(group.name)
    # A module registered twice is listed once by named_modules(): .get for the second name.
    groups = [_Group(prefix + name, True, order.get(prefix + name, group.position))
              for name, child in parent.named_children() if _has_parameters(child)]
    if _has_own_parameters(parent):
        groups.append(_Group(group.name, False, group.position))
    return groups


def _expandable(module: "torch.nn.Module", group: _Group) -> bool:
    if not group.subtree:
        return False
    return any(_has_parameters(child) for child in module.get_submodule(group.name).children())


def _step_name(module: "torch.nn.Module", group: _Group) -> str:
    """The module's name; for a container's own parameters, the parameters' names."""
    submodule = module.get_submodule(group.name)
    if group.subtree or not any(_has_parameters(child) for child in submodule.children()):
        return group.name or "(the whole model)"
    prefix = f"{group.name}." if group.name else ""
    return ", ".join(prefix + name for name, _ in submodule.named_parameters(recurse=False))


def randomization_steps(module: "torch.nn.Module", sample: "torch.Tensor",
                        max_steps: int | None = MAX_STEPS) -> list[RandomizationStep]:
    """The steps of a cascading randomization of ``module``, from the output to the input.

    ``sample`` is one preprocessed input for the probe forward pass that orders the layers.
    """
    order = call_order(module, sample)
    if max_steps is None:
        groups = [_Group(name, False, order[name]) for name, submodule in module.named_modules()
                  if _has_own_parameters(submodule)]
    else:
        groups = [_Group("", True, 0)] if _has_parameters(module) else []
        while any(_expandable(module, group) for group in groups):
            expanded = [part for group in groups
                        for part in (_children_groups(module, group, order)
                                     if _expandable(module, group) else [group])]
            if len(expanded) > max_steps and len(groups) > 1:
                break
            groups = expanded
            if len(groups) > max_steps:
                break
    # Registration order breaks ties in the call order (e.g. modules that never ran).
    registration = {name: index for index, (name, _) in enumerate(module.named_modules())}
    groups.sort(key=lambda group: (group.position, registration.get(group.name, 0),
                                   not group.subtree),
                reverse=True)
    steps = [RandomizationStep(_step_name(module, group), ((group.name, group.subtree),))
             for group in groups]
    if max_steps is not None and len(steps) > max_steps:
        steps = _merged(steps, max_steps)
    return steps


def _merged(steps: list[RandomizationStep], count: int) -> list[RandomizationStep]:
    """``steps`` merged into ``count`` contiguous runs of nearly equal length."""
    bounds = [round(index * len(steps) / count) for index in range(count + 1)]
    merged = []
    for start, stop in zip(bounds, bounds[1:]):
        run = steps[start:stop]
        name = run[0].name if len(run) == 1 else f"{run[0].name} ... {run[-1].name}"
        merged.append(RandomizationStep(name, tuple(part for step in run for part in step.parts)))
    return merged


def _reset_own(submodule: "torch.nn.Module") -> None:
    """Re-initialize the parameters (and, for norms, running statistics) a module holds itself;
    whatever its reset method does to child modules is undone."""
    import torch

    reset = getattr(submodule, "reset_parameters", None) or \
        getattr(submodule, "_reset_parameters", None)
    if callable(reset):
        children = [tensor for child in submodule.children()
                    for tensor in (*child.parameters(), *child.buffers())]
        saved = [tensor.detach().clone() for tensor in children]
        reset()
        with torch.no_grad():
            for tensor, value in zip(children, saved):
                tensor.copy_(value)
        return
    with torch.no_grad():
        for parameter in submodule.parameters(recurse=False):
            values = parameter.detach().float()
            spread = float(values.std()) if values.numel() > 1 else 0.0
            if spread > 0:
                parameter.normal_(float(values.mean()), spread)


def reinitialize(module: "torch.nn.Module", step: RandomizationStep) -> None:
    """Re-initialize, in place, the parameters of ``step`` in ``module``."""
    for name, subtree in step.parts:
        root = module.get_submodule(name)
        for submodule in (root.modules() if subtree else [root]):
            has_state = _has_own_parameters(submodule) or any(
                True for _ in submodule.buffers(recurse=False))
            if has_state:
                _reset_own(submodule)
