"""Input adapters: map images ``(N, C, H, W)`` in ``[0, 1]`` to whatever a model takes.

A model from the outside world may expect its input normalized with a
per-channel mean/std, in channels-last layout ``(N, H, W, C)``, or flattened
``(N, 784, 1)``. :class:`ImageModel` puts those conversions in front of the
network so the rest of the library (perturbations, certification) only ever
sees images in pixel space ``[0, 1]`` and NCHW layout.

Everything in :meth:`ImageModel.forward` is a plain subtraction, division,
reshape or permute with constant buffers, so ``auto_LiRPA.BoundedModule`` can
trace through it: the bounds are computed in pixel space.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence, Tuple, get_args

import torch
from torch import nn

from ..domain import check_normalization
from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .loading import LoadedModel

Layout = Literal["nchw", "nhwc", "flat"]

_LAYOUTS: Tuple[str, ...] = get_args(Layout)


def _channels(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate an image shape ``(C, H, W)`` and return it as a tuple of ints."""
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise UsageError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}",
                         param="image_shape")
    return shape  # type: ignore[return-value]


def _default_input_shape(image_shape: tuple[int, int, int], layout: str) -> tuple[int, ...]:
    c, h, w = image_shape
    return {"nchw": (c, h, w), "nhwc": (h, w, c), "flat": (c * h * w,)}[layout]


def _check_layout(image_shape: tuple[int, int, int], layout: str, input_shape: tuple[int, ...]) -> None:
    """Raise UsageError unless ``layout`` turns ``image_shape`` into ``input_shape``."""
    if layout not in _LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of {', '.join(_LAYOUTS)}", param="layout")
    c, h, w = image_shape
    if layout == "flat":
        if math.prod(input_shape) != c * h * w:
            raise UsageError(
                f"layout flat: the model input shape {input_shape} does not hold {c}x{h}x{w} = {c * h * w} "
                f"pixel values; check input_shape", param="layout", related=("input_shape",)
            )
        return
    expected = _default_input_shape(image_shape, layout)
    if input_shape != expected:
        raise UsageError(
            f"layout {layout} needs model input shape {expected} for images {image_shape}, "
            f"but the model takes {input_shape}; check input_shape", param="layout", related=("input_shape",)
        )


def _infer_layout(input_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> Layout:
    """Guess the layout that turns images ``(C, H, W)`` into the model's ``input_shape``.

    ``(C, H, W)`` is NCHW, ``(H, W, C)`` is NHWC. A shape that is the image with
    its values in the same (C-order) sequence, such as ``(784,)``, ``(784, 1)``
    or ``(1, 784)`` for a 1x28x28 image, is "flat". Anything else that holds the
    same number of values could be flattened in more than one order, so we ask.
    """
    c, h, w = image_shape
    nchw = input_shape == (c, h, w)
    nhwc = input_shape == (h, w, c)
    if nchw and nhwc and c > 1:  # only when C == H == W
        raise UsageError(
            f"cannot tell whether the model input {input_shape} is channels-first or channels-last; "
            f"give layout nchw or nhwc", param="layout"
        )
    if nchw:
        return "nchw"
    if nhwc:
        return "nhwc"
    if math.prod(input_shape) != c * h * w:
        raise UsageError(
            f"the model takes input of shape {input_shape}, which does not fit images of shape {image_shape}; "
            f"check input_shape and the dataset's image size", param="input_shape"
        )
    squeezed = tuple(d for d in input_shape if d != 1)
    image_squeezed = tuple(d for d in image_shape if d != 1)
    if len(squeezed) <= 1 or squeezed == image_squeezed:
        return "flat"
    raise UsageError(
        f"the model input {input_shape} holds the {c}x{h}x{w} image values but their order is ambiguous; "
        f"give layout flat (channel-major order), nchw or nhwc, and input_shape if needed",
        param="layout", related=("input_shape",),
    )


class ImageModel(nn.Module):
    """Maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)``: normalize, then convert layout, then call the net.

    Args:
        net: the wrapped model; takes ``(N, *input_shape)`` and returns logits ``(N, K)``.
        image_shape: ``(C, H, W)`` of the images fed to :meth:`forward`.
        layout: how images are laid out for ``net``:
            ``"nchw"`` passes ``(N, C, H, W)`` unchanged; ``"nhwc"`` permutes to
            ``(N, H, W, C)``; ``"flat"`` reshapes the channel-major values
            (``C``, then ``H``, then ``W``) to ``(N, *input_shape)``.
        input_shape: per-sample shape ``net`` takes (no batch dim). Defaults to
            ``(C, H, W)``, ``(H, W, C)`` or ``(C*H*W,)`` by layout.
        mean, std: per-channel normalization ``(x - mean) / std`` applied in NCHW
            before the layout change; both or neither, 1 or ``C`` finite values each,
            std > 0 (:func:`~lirpa_patch.domain.check_normalization`).

    Attributes ``image_shape``, ``layout``, ``input_shape`` hold the resolved values;
    ``mean``/``std`` are tuples of ``C`` floats, or ``None`` when not given.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        image_shape: tuple[int, int, int],
        layout: Layout = "nchw",
        input_shape: tuple[int, ...] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        image_shape = _channels(image_shape)
        if layout not in _LAYOUTS:
            raise UsageError(f"unknown layout {layout!r}; choose one of {', '.join(_LAYOUTS)}", param="layout")
        if input_shape is None:
            input_shape = _default_input_shape(image_shape, layout)
        input_shape = tuple(int(d) for d in input_shape)
        _check_layout(image_shape, layout, input_shape)
        channels = image_shape[0]
        mean_t, std_t = check_normalization(mean, std, channels)

        self.net = net
        self.image_shape: tuple[int, int, int] = image_shape
        self.layout: Layout = layout
        self.input_shape: tuple[int, ...] = input_shape
        self.mean: tuple[float, ...] | None = mean_t
        self.std: tuple[float, ...] | None = std_t
        self._normalize = mean_t is not None or std_t is not None
        mean_values = torch.tensor(mean_t if mean_t is not None else (0.0,) * channels, dtype=torch.float32)
        std_values = torch.tensor(std_t if std_t is not None else (1.0,) * channels, dtype=torch.float32)
        # (1, C, 1, 1) so they broadcast over (N, C, H, W); buffers follow .to(device).
        self.register_buffer("_mean", mean_values.view(1, channels, 1, 1))
        self.register_buffer("_std", std_values.view(1, channels, 1, 1))
        self.train(net.training)  # mirror the net: a loaded (eval-mode) net gives an eval-mode wrapper

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` -> the net's input ``(N, *input_shape)``."""
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != self.image_shape:
            raise UsageError(
                f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )
        if self._normalize:
            # Elementwise Sub/Div by per-channel constants: exact under IBP, and the form the
            # sparse plugin operators recognise. (auto_LiRPA 0.3's CROWN in conv "patches" mode
            # cannot go back through a per-channel Div in front of a conv; the engine builds
            # CROWN BoundedModules in "matrix" mode, see lirpa_patch.engine.bound_model.)
            x = (x - self._mean) / self._std
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        elif self.layout == "flat":
            x = x.reshape(-1, *self.input_shape)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, K)``."""
        return self.net(self.preprocess(x))

    def extra_repr(self) -> str:
        return (
            f"image_shape={self.image_shape}, layout={self.layout!r}, input_shape={self.input_shape}, "
            f"mean={self.mean}, std={self.std}"
        )


def image_model(
    loaded: "LoadedModel",
    *,
    image_shape: tuple[int, int, int],
    layout: Layout | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageModel:
    """Wrap a loaded model so it takes images ``(N, C, H, W)`` in ``[0, 1]``.

    ``layout=None`` infers it from ``loaded.input_shape`` and ``image_shape``:
    ``(C, H, W)`` is "nchw", ``(H, W, C)`` is "nhwc", a vector-like shape with
    ``C*H*W`` values (``(784,)``, ``(784, 1)``, ``(1, 784)``) is "flat"; an
    ambiguous or incompatible shape raises :class:`UsageError`, and so does an
    ``nn.Module`` passed as ``loaded`` (``load_model(module, input_shape=...)`` makes one
    a ``LoadedModel``; :class:`ImageModel` takes modules directly).
    """
    if not hasattr(loaded, "module") or not hasattr(loaded, "input_shape"):
        what = "an nn.Module" if isinstance(loaded, nn.Module) else f"a {type(loaded).__name__}"
        raise UsageError(
            f"image_model takes a LoadedModel, got {what}; wrap it with "
            f"load_model(module, input_shape=...) first, or use ImageModel(module, image_shape=...)",
            param="loaded",
        )
    image_shape = _channels(image_shape)
    input_shape = tuple(loaded.input_shape)
    if layout is None:
        layout = _infer_layout(input_shape, image_shape)
    return ImageModel(
        loaded.module, image_shape=image_shape, layout=layout, input_shape=input_shape, mean=mean, std=std
    )
