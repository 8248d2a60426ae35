"""Specification matrices: margins ``z_true - z_other`` for every other class."""

from __future__ import annotations

import torch

from .errors import DataError


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


def margin_spec(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The specification ``C`` with ``C @ z = z_true - z_other``.

    Args:
        labels: ``(N,)`` true labels, each in ``[0, num_classes)``.
        num_classes: ``K``.
    Returns:
        ``(N, K - 1, K)``: row ``j`` of image ``i`` is ``e_{label_i} - e_{other_ij}``.

    Raises:
        DataError: when a label is out of range.
    """
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels must be in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"got labels in [{int(labels.min())}, {int(labels.max())}]"
        )
    n = labels.shape[0]
    others = other_classes(labels, num_classes)
    spec = torch.zeros(n, num_classes - 1, num_classes, dtype=dtype, device=labels.device)
    spec.scatter_(2, labels[:, None, None].expand(n, num_classes - 1, 1), 1.0)
    spec.scatter_(2, others[:, :, None], -1.0)
    return spec
