"""Cross-check a converted model against onnxruntime: the same logits from the same inputs.

:func:`check_against_onnxruntime` runs an :class:`~lirpa_patch.models.ImageModel` (torch) and
the ONNX file it came from (onnxruntime, CPU) on the same preprocessed images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, UsageError
from .adapter import ImageModel
from .loading import PathLike, _one_line


def _ort_session(onnx_model: Path | bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    name = "the exported model" if isinstance(onnx_model, bytes) else onnx_model.name
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {name}: {_one_line(exc)}") from None


def _ort_run(session, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``inputs (N, *input_shape)`` through ``session`` in batches; logits ``(N, K)``."""
    meta = session.get_inputs()[0]
    batch_dim = meta.shape[0] if meta.shape else None
    if isinstance(batch_dim, int) and batch_dim > 0:
        batch_size = batch_dim  # a fixed batch (usually 1): feed that many at a time
    dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(meta.type, np.float32)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size].astype(dtype)
        count = len(chunk)
        if count < batch_size and isinstance(batch_dim, int) and batch_dim > 0:
            # fixed batch: pad with copies of the last input, drop their outputs
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)], axis=0)
        try:
            out = session.run(None, {meta.name: chunk})[0]
        except Exception as exc:
            raise ModelError(f"onnxruntime failed to run the model: {_one_line(exc)}") from None
        outputs.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1)[:count])
    return np.concatenate(outputs, axis=0)


def check_against_onnxruntime(
    model: ImageModel,
    onnx_path: PathLike | bytes,
    images: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Check that the torch model computes what onnxruntime computes from the ONNX file (or its bytes).

    ``images`` ``(N, C, H, W)`` in ``[0, 1]`` go through ``model`` (torch), and the
    same preprocessed inputs ``model.preprocess(images)`` ``(N, *input_shape)`` go
    through onnxruntime (CPU), in batches (one at a time if the ONNX input has a
    fixed batch of 1).

    Tolerance: every logit must satisfy ``|torch - ort| <= atol + rtol * |ort|``
    (elementwise, like ``numpy.allclose``; defaults ``atol=1e-4``, ``rtol=1e-3``),
    and the predicted class must agree wherever onnxruntime's top-2 logit gap
    exceeds ``atol + rtol * |top logit|`` (a near-tie may flip either way).

    Returns:
        The largest absolute logit difference.

    Raises:
        ModelError: a logit or a clear-cut prediction differs, or onnxruntime fails.
    """
    if not isinstance(onnx_path, bytes):
        onnx_path = Path(onnx_path)
    if images.dim() != 4:
        raise UsageError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if len(images) == 0:
        return 0.0
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        x = images.to(device=device, dtype=torch.float32)
        inputs = model.preprocess(x).cpu().numpy()
        ours = model(x).double().cpu().numpy()
    theirs = _ort_run(_ort_session(onnx_path), inputs, batch_size=64)
    if ours.shape != theirs.shape:
        raise ModelError(f"torch gives logits of shape {ours.shape} but onnxruntime gives {theirs.shape}")
    if not np.isfinite(ours).all():
        raise ModelError("the torch model returns NaN or infinite logits")
    if not np.isfinite(theirs).all():
        raise ModelError("onnxruntime returns NaN or infinite logits")
    diff = np.abs(ours - theirs)
    max_diff = float(diff.max())
    bad = diff > atol + rtol * np.abs(theirs)
    if bad.any():
        index = int(np.argwhere(bad)[0][0])
        raise ModelError(
            f"the converted model disagrees with onnxruntime on {int(bad.any(axis=1).sum())} of {len(ours)} "
            f"images (max |logit difference| {max_diff:.3g}, first at image {index}; tolerance {atol} + {rtol}*|logit|)"
        )
    top2 = np.sort(theirs, axis=1)[:, -2:] if theirs.shape[1] > 1 else np.concatenate([theirs, theirs], axis=1)
    clear = (top2[:, 1] - top2[:, 0]) > atol + rtol * np.abs(top2[:, 1])
    flipped = (ours.argmax(axis=1) != theirs.argmax(axis=1)) & clear
    if flipped.any():
        raise ModelError(
            f"the converted model predicts a different class than onnxruntime on {int(flipped.sum())} of "
            f"{len(ours)} images"
        )
    return max_diff
