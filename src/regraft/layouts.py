"""Tensor layouts of other frameworks: how a Keras variable looks in a PyTorch ``state_dict``.

A source in the ``torch`` namespace (safetensors or npz with names like
``features.0.weight``) holds tensors in PyTorch's layouts. Matching compares them
with each model variable *as PyTorch would store it* (:func:`torch_view`), so
roles and shapes line up; a variable whose layouts differ is then written
through a named transform of :mod:`regraft.transforms`, shown in the plan.

The facts (PyTorch's ``torch.nn`` documentation of each module's parameters,
Keras 3's layer documentation of its variables):

=========================  =====================================  ==================================  ======================
Keras layer, variable      Keras shape                            PyTorch parameter and shape         transform
=========================  =====================================  ==================================  ======================
Dense ``kernel``           ``[in, out]``                          Linear ``weight [out, in]``         ``linear_to_dense``
Dense ``bias``             ``[out]``                              Linear ``bias [out]``               —
ConvND ``kernel``          ``[*spatial, in/groups, out]``         ConvNd ``weight [out, in/groups,    ``conv_oihw_to_hwio``
                                                                  *spatial]``
ConvNDTranspose ``kernel`` ``[*spatial, out, in]``                ConvTransposeNd ``weight [in, out,  ``conv_oihw_to_hwio``
                                                                  *spatial]``
DepthwiseConvND ``kernel`` ``[*spatial, C, M]``                   ConvNd(groups=C) ``weight [C*M, 1,  ``depthwise_oihw_to_hwcm``
                                                                  *spatial]``
BatchNormalization         ``gamma, beta, moving_mean,            BatchNormNd ``weight, bias,         —
                           moving_variance``                      running_mean, running_var``
                                                                  (+ ``num_batches_tracked``:
                                                                  bookkeeping, not loaded)
LayerNormalization,        ``gamma, beta``                        LayerNorm/GroupNorm ``weight, bias``  —
GroupNormalization
Embedding ``embeddings``   ``[input_dim, output_dim]``            Embedding ``weight [num, dim]``     —
=========================  =====================================  ==================================  ======================

Not converted by a layout: defaults that differ between the frameworks, such as
BatchNormalization's epsilon (Keras 1e-3, PyTorch 1e-5) or a Conv2D's padding.
Build the Keras model with the old model's values (``epsilon=1e-5``) and check
with :func:`regraft.verify`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from regraft.entries import TargetVariable

__all__ = ["LAYOUTS", "View", "torch_view", "view_targets"]

_CONV = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}
_DEPTHWISE = {"DepthwiseConv1D", "DepthwiseConv2D"}
_NORM_ROLES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_NORMS = {"BatchNormalization", "LayerNormalization", "GroupNormalization"}


class View(NamedTuple):
    """How one variable looks in another layout."""

    role: str  # the parameter's name there (``weight``)
    shape: tuple[int, ...]
    transform: str | None  # the transform from that layout to Keras', ``None`` when they agree


def torch_view(layer_class: str, role: str, shape: tuple[int, ...]) -> View:
    """A Keras variable as PyTorch stores it: its parameter name, shape, and the transform back.

    Example:
        >>> torch_view("Dense", "kernel", (784, 128))
        View(role='weight', shape=(128, 784), transform='linear_to_dense')
        >>> torch_view("Conv2D", "kernel", (3, 3, 16, 32))
        View(role='weight', shape=(32, 16, 3, 3), transform='conv_oihw_to_hwio')
        >>> torch_view("DepthwiseConv2D", "kernel", (3, 3, 16, 2))
        View(role='weight', shape=(32, 1, 3, 3), transform='depthwise_oihw_to_hwcm')
        >>> torch_view("BatchNormalization", "moving_variance", (16,))
        View(role='running_var', shape=(16,), transform=None)
    """
    shape = tuple(shape)
    if layer_class == "Dense" and role == "kernel" and len(shape) == 2:
        return View("weight", (shape[1], shape[0]), "linear_to_dense")
    if layer_class in _CONV and role == "kernel" and len(shape) >= 3:
        return View("weight", (shape[-1], shape[-2], *shape[:-2]), "conv_oihw_to_hwio")
    if layer_class in _DEPTHWISE and role == "kernel" and len(shape) >= 3:
        return View("weight", (shape[-2] * shape[-1], 1, *shape[:-2]), "depthwise_oihw_to_hwcm")
    if layer_class in _NORMS and role in _NORM_ROLES:
        return View(_NORM_ROLES[role], shape, None)
    if layer_class == "Embedding" and role == "embeddings":
        return View("weight", shape, None)
    return View(role, shape, None)


#: Layout name (a namespace's ``layout``) → the view function.
LAYOUTS = {"torch": torch_view}


def view_targets(targets: list[TargetVariable], layout: str, namespace: str
                 ) -> tuple[list[TargetVariable], dict[str, tuple[TargetVariable, str | None]]]:
    """The variables as the ``layout`` stores them, keyed in ``namespace``, and the way back.

    Each returned variable has the layout's shape and its key in ``namespace``
    (the target computes it; ``layer/parameter`` from the readable key if not); the map
    gives, by readable key, the original variable and the transform that turns
    the layout's tensor into it (``None`` when the layouts agree).
    """
    view = LAYOUTS[layout]
    out, back = [], {}
    for t in targets:
        v = view(t.layer_class, t.role, t.shape)
        key = t.keys.get(namespace) or (f"{t.layer}/{v.role}" if t.layer else v.role)
        out.append(replace(t, shape=v.shape, keys={**t.keys, namespace: key}))
        back[t.key] = (t, v.transform)
    return out, back
