"""Specification matrices: margins ``z_true - z_other`` for every other class."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import DataError, ModelError


def certifies(margin):
    """Whether lower margins certify: strictly above zero (a float, or elementwise for a tensor).

    A margin bound of exactly 0 does not certify: a patch reaching it ties the logits, and
    ``argmax`` may then return the other class. Every certified decision (engine, location
    groups, cascade, training metrics, reports) is this one comparison.
    """
    return margin > 0


def other_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices of the classes other than each label.

    Args:
        labels: ``(N,)`` int64.
    Returns:
        ``(N, K - 1)`` int64, in increasing class order.
    """
    labels = labels.long()
    all_classes = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], num_classes)
    keep = all_classes != labels[:, None]
    return all_classes[keep].reshape(labels.shape[0], num_classes - 1)


def check_labels(
    labels: torch.Tensor,
    num_classes: int,
    *,
    name: str = "labels",
    indices: Optional[Sequence[int] | torch.Tensor] = None,
) -> None:
    """The one label rule of certification and training: every label is in ``[0, K)``.

    ``K`` is the number of model outputs (for training: of the model being trained).

    Args:
        labels: ``(N,)`` integer labels.
        num_classes: ``K``.
        name: what the labels belong to, for the message (e.g. the dataset's name).
        indices: dataset index of each label, to name the first bad image (default ``0..N-1``).

    Raises:
        ModelError: ``K < 2`` (nothing to certify).
        DataError: a label is negative or ``>= K``; the message names how many and the first.
    """
    if num_classes < 2:
        raise ModelError(f"the model has {num_classes} output; at least 2 classes are needed")
    labels = torch.as_tensor(labels).long().flatten()
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if bad.numel():
        first = int(bad[0])
        index = int(indices[first]) if indices is not None else first
        raise DataError(
            f"{name}: {bad.numel()} label(s) out of range for a model with {num_classes} outputs "
            f"(labels must be 0-{num_classes - 1}; image {index} has label {int(labels[first])})"
        )


def margin_spec(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The specification ``C`` with ``C @ z = z_true - z_other``.

    Args:
        labels: ``(N,)`` true labels, each in ``[0, num_classes)``.
        num_classes: ``K``.
    Returns:
        ``(N, K - 1, K)``: row ``j`` of image ``i`` is ``e_{label_i} - e_{other_ij}``.

    Raises:
        DataError: when a label is out of range (:func:`check_labels`).
    """
    labels = labels.long()
    check_labels(labels, num_classes)
    n = labels.shape[0]
    others = other_classes(labels, num_classes)
    spec = torch.zeros(n, num_classes - 1, num_classes, dtype=dtype, device=labels.device)
    spec.scatter_(2, labels[:, None, None].expand(n, num_classes - 1, 1), 1.0)
    spec.scatter_(2, others[:, :, None], -1.0)
    return spec
