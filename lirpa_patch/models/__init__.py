"""Model loading and input adapters.

``load_model`` reads ONNX / TorchScript / pickled ``nn.Module`` files into a
:class:`LoadedModel`; ``image_model`` wraps it in an :class:`ImageModel` that
takes images ``(N, C, H, W)`` in ``[0, 1]`` (normalization and layout
conversion included, traceable by auto_LiRPA); ``check_against_onnxruntime``
cross-checks the converted model against onnxruntime.
"""

from __future__ import annotations

from .adapter import ImageModel, Layout, image_model
from .crosscheck import check_against_onnxruntime
from .loading import LoadedModel, load_model

__all__ = ["ImageModel", "Layout", "LoadedModel", "check_against_onnxruntime", "image_model", "load_model"]
