"""The auto_LiRPA module of a model: building it with the plugin operators, and checking one passed in.

:func:`bound_model` builds the ``BoundedModule`` every bound of this package goes through;
a module a caller passes back (``bounded=``) is checked against the model as it is now.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from auto_LiRPA import BoundedModule

from ._messages import first_line, quiet
from ._messages import quiet as _quiet  # noqa: F401  (engine.py and margins.py import it from here)
from .errors import ModelError, UsageError
from .head import strip_monotone_output
from .ops.graph import prepare
from .ops.registry import bound_opts, custom_ops
from .provenance import attach, changes_since_built


@contextlib.contextmanager
def _unsupported_ops(names: list) -> Iterator[None]:
    """Collect into ``names`` the op types auto_LiRPA reports it cannot bound while parsing a
    graph (it logs them, then raises a bare "There are unsupported operations"), and keep
    those log lines from being printed."""
    import logging

    def capture(record: logging.LogRecord) -> bool:
        node = record.args[0] if isinstance(record.args, tuple) and record.args else None
        op = getattr(node, "op", None)
        if isinstance(op, str) and "unsupported operation" in str(record.msg):
            name = op.split("::")[-1]
            operator = (getattr(node, "attr", None) or {}).get("operator") if name == "ATen" else None
            name = f"ATen({operator})" if operator else name  # an op torch exported as an ATen fallback
            if name not in names:
                names.append(name)
            return False
        return not str(record.msg).startswith(("Unsupported operations", "Name: "))

    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("auto_LiRPA")]
    for logger in loggers:
        logger.addFilter(capture)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(capture)


def bound_model(
    model: torch.nn.Module,
    image_shape: Sequence[int],
    device: str | torch.device = "cpu",
    *,
    conv_mode: str = "matrix",
) -> BoundedModule:
    """Wrap a model that maps images ``(N, C, H, W)`` to logits in an auto_LiRPA ``BoundedModule``.

    The module carries the plugin bound operators (:func:`lirpa_patch.custom_ops`)
    that make both threats exact and fast; they behave like auto_LiRPA's own
    operators for every other perturbation. A final ``Softmax``/``LogSoftmax`` is
    left out (certifying the logits certifies the argmax; see :mod:`lirpa_patch.head`).

    ``conv_mode`` is auto_LiRPA's representation of convolutions under CROWN. The
    default ``"matrix"`` works through every graph we build (auto_LiRPA 0.3's
    ``"patches"`` mode fails on a per-channel normalization before a conv); IBP
    does not depend on it.

    Raises:
        ModelError: when auto_LiRPA cannot parse the model (e.g. an unsupported op).
    """
    stripped_model, stripped = strip_monotone_output(model)
    dummy = torch.zeros(1, *[int(v) for v in image_shape], device=device)
    unsupported: list[str] = []
    try:
        with quiet(), _unsupported_ops(unsupported):
            bounded = BoundedModule(stripped_model, dummy, bound_opts=bound_opts({"conv_mode": conv_mode}),
                                    device=str(device), custom_ops=custom_ops())
    except Exception as exc:  # auto_LiRPA raises assorted errors for unsupported graphs
        if unsupported:
            raise ModelError(
                f"auto_LiRPA cannot bound this model: it has no bounds for the op(s) {', '.join(unsupported)}; "
                f"replace them in the model (auto_LiRPA.register_custom_op can add an op)") from exc
        raise ModelError(
            f"auto_LiRPA cannot bound this model: {type(exc).__name__}: {first_line(exc, default='')}") from exc
    prepare(bounded)
    object.__setattr__(bounded, "_lp_stripped", list(stripped))
    if next(bounded.parameters(), None) is None:
        # auto_LiRPA's CROWN reads its dtype from the module's first parameter; a model that
        # keeps its weights in buffers (e.g. some ONNX conversions) has none.
        torch.nn.Module.register_parameter(bounded, "_lp_dtype",
                                           torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False))
    attach(bounded, model)
    return bounded


def _check_bounded(model: torch.nn.Module, bounded: BoundedModule, images: torch.Tensor, logits: torch.Tensor) -> None:
    """UsageError (``bounded``) when a module passed by the caller no longer bounds ``model``.

    Compared exactly (:mod:`lirpa_patch.provenance`) for a module from :func:`bound_model`:
    submodules, replaced parameters, buffers and tensor attributes by content, code and
    hooks; for any module, its logits on the images at hand.
    """
    what = changes_since_built(model, bounded)
    if what is not None:
        raise UsageError(f"the model changed after bounded was built ({what}): build it again with "
                         "bound_model(model, ...)", param="bounded")
    few = images[: min(8, images.shape[0])]
    with torch.no_grad(), quiet():
        ours = bounded(few).float()
        if bounded.__dict__.get("_lp_stripped"):  # the module bounds the logits before a final Softmax
            logits = strip_monotone_output(model)[0](few)
    if ours.shape != logits[:8].shape or not torch.allclose(ours, logits[:8].float(), rtol=1e-4, atol=1e-5):
        raise UsageError("bounded does not compute the model's logits on these images: build it again with "
                         "bound_model(model, ...) after any change of the model", param="bounded")
