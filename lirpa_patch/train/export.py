"""ONNX export of a trained model that takes images ``(N, C, H, W)`` in ``[0, 1]``.

The normalization of an :class:`~lirpa_patch.models.adapter.ImageModel` is folded
into the first layer when that is exact: a ``Linear`` (after ``Flatten``) or a
``Conv2d`` without padding gets ``W' = W / std`` and ``b' = b - W' mean``. A
padded convolution pads with zeros *after* normalization, which no first-layer
weights can reproduce, so there the normalization stays as explicit ``Sub``/``Div``
nodes in front. Either way the exported graph takes ``[0, 1]`` images, with a
dynamic batch dimension, and is checked against onnxruntime.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import outputs
from .._messages import first_line, quiet
from ..errors import ModelError, UsageError

PathLike = Union[str, os.PathLike]


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as constant Sub/Div nodes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _fold_first(net: nn.Sequential, mean: torch.Tensor, std: torch.Tensor, image_shape: Sequence[int]) -> bool:
    """Fold per-channel ``mean``/``std`` ``(C,)`` into the first layer of ``net`` in place; False if not exact."""
    c, h, w = (int(v) for v in image_shape)
    layers = list(net)
    i = 1 if layers and isinstance(layers[0], nn.Flatten) else 0
    if i >= len(layers):
        return False
    first = layers[i]
    with torch.no_grad():
        if isinstance(first, nn.Linear) and i == 1 and first.in_features == c * h * w:
            s = std.repeat_interleave(h * w)  # C-major flatten
            m = mean.repeat_interleave(h * w)
            first.weight.div_(s[None, :])
            if first.bias is None:
                first.bias = nn.Parameter(torch.zeros(first.out_features))
            first.bias.sub_(first.weight @ m)
            return True
        unpadded = isinstance(first, nn.Conv2d) and isinstance(first.padding, tuple) and not any(first.padding)
        if unpadded and i == 0 and first.groups == 1:
            first.weight.div_(std.view(1, -1, 1, 1))
            if first.bias is None:
                first.bias = nn.Parameter(torch.zeros(first.out_channels))
            first.bias.sub_((first.weight * mean.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
            return True
    return False


def exportable_module(model: nn.Module, image_shape: Sequence[int]) -> nn.Module:
    """A copy of ``model`` that takes ``[0, 1]`` images ``(N, C, H, W)``, normalization folded in.

    ``model`` is an ``ImageModel``-like wrapper (attributes ``net``, ``mean``,
    ``std``, ``layout``) or any module that already takes ``[0, 1]`` images.
    """
    net = getattr(model, "net", None)
    if net is None or not hasattr(model, "layout"):
        return copy.deepcopy(model).cpu().eval()
    if getattr(model, "layout", "nchw") != "nchw":
        raise UsageError("export supports NCHW models only", param="model")
    net = copy.deepcopy(net).cpu().eval()
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if mean is None and std is None:
        return net
    c = int(image_shape[0])
    m = torch.tensor(mean if mean is not None else (0.0,) * c, dtype=torch.float32)
    s = torch.tensor(std if std is not None else (1.0,) * c, dtype=torch.float32)
    if isinstance(net, nn.Sequential) and _fold_first(net, m, s, image_shape):
        return net
    return nn.Sequential(_Normalize(m.tolist(), s.tolist()), net).eval()


def export_onnx(
    model: nn.Module,
    path: PathLike,
    image_shape: Sequence[int],
    *,
    check_images: Optional[torch.Tensor] = None,
    opset: int = 13,
) -> float:
    """Export ``model`` to ONNX (input ``image`` ``(N, C, H, W)`` in ``[0, 1]``, output ``logits``).

    Args:
        model: see :func:`exportable_module`.
        path: the ``.onnx`` file to write, as :mod:`lirpa_patch.outputs` writes every output
            (a regular file atomically; a symlink through to its target; a device or FIFO
            into). Written only after onnxruntime agreed with PyTorch on the exported bytes.
        image_shape: ``(C, H, W)``.
        check_images: ``(N, C, H, W)`` images on which the folded copy must match
            ``model`` and onnxruntime must match the folded copy (default: 16
            random images).

    Returns:
        The largest absolute logit difference between ``model`` and onnxruntime.

    Raises:
        ModelError: the export fails or onnxruntime disagrees with PyTorch.
        LirpaPatchError: ``path`` cannot be written.
    """
    from ..models.adapter import ImageModel
    from ..models.crosscheck import check_against_onnxruntime

    path = Path(path)
    shape = tuple(int(v) for v in image_shape)
    module = exportable_module(model, shape)
    if check_images is None:
        check_images = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
    check_images = check_images.detach().float().cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            reference = model(check_images.to(device)).double().cpu()
            folded = module(check_images).double()
    finally:
        model.train(was_training)
    fold_diff = float((reference - folded).abs().max())
    if fold_diff > 1e-4 * (1.0 + float(reference.abs().max())):
        raise ModelError(f"folding the normalization changed the logits by {fold_diff:.3g}")
    buffer = io.BytesIO()
    try:
        with quiet():
            torch.onnx.export(
                module, (torch.zeros(1, *shape),), buffer, dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:
        raise ModelError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc, default='')}") from None
    wrapper = ImageModel(module, image_shape=shape)
    ort_diff = check_against_onnxruntime(wrapper, buffer.getvalue(), check_images)  # before writing anything
    if path.parent != Path("") and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}", param="path") from None
    outputs.write_output(path, buffer.getvalue(), what="the ONNX model")
    return max(ort_diff, fold_diff)
