"""lirpa-patch: certified defenses against adversarial patches and sparse attacks.

An auto_LiRPA plugin. Public API::

    from lirpa_patch import PatchPerturbation, SparsePerturbation, certify

Importing this package applies the small compatibility shims auto_LiRPA 0.3
needs on torch 2.x / numpy 2 (see ``lirpa_patch._compat``) and changes nothing
else in auto_LiRPA: the plugin's bound operators are used only by the
``BoundedModule`` objects that ask for them (:func:`custom_ops`).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version as _dist_version

from . import _compat

try:
    __version__ = _dist_version("lirpa-patch")
except PackageNotFoundError:  # pragma: no cover - a checkout that is not installed
    __version__ = "unknown"

# torch logs a CUDA_HOME notice when auto_LiRPA imports cpp_extension on a
# machine without CUDA; it is noise for our users.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

with _compat.quiet_import():
    _compat.apply()
    try:
        import auto_LiRPA
    except ImportError as exc:  # pragma: no cover - exercised by hand
        if exc.name not in ("auto_LiRPA", None):
            raise ImportError(
                f"auto_LiRPA is installed but cannot be imported: {exc} "
                "(install the missing package, or reinstall with `make install`)"
            ) from exc
        raise ImportError(
            "lirpa-patch needs auto_LiRPA, which is not installed. Install it with "
            "`pip install --no-deps auto-LiRPA==0.3` (its metadata pins an old torch; "
            "lirpa-patch patches it to run on torch 2.x), or run `make install`."
        ) from exc
    _compat.apply_after_import()

from .attacks import AttackResult, attack, attack_patch, attack_rows, attack_sparse
from .data import Dataset, load_dataset
from .domain import PixelDomain
from .engine import (
    CertifyResult,
    ImageResult,
    bound_model,
    certify,
    certify_sparse,
    lower_margins,
    sparse_lower_margins,
)
from .errors import DataError, LirpaPatchError, ModelError, UsageError
from .evaluation import Evaluation, consistency_violations, evaluate, evaluate_patch, evaluate_sparse
from .locations import Locations, all_locations
from .models import ImageModel, LoadedModel, image_model, load_model
from .shapes import PatchShape, make_shape
from .ops import bounded_module, custom_ops
from .spec import margin_spec
from .threats import PatchPerturbation, SparsePerturbation
from .threats.base import Threat
from .threats.patch import PatchThreat
from .threats.sparse import SparseThreat
from .train import TrainConfig, Trainer


def auto_lirpa_version() -> str:
    """The installed auto_LiRPA version string."""
    return getattr(auto_LiRPA, "__version__", "unknown")


__all__ = [
    "AttackResult",
    "CertifyResult",
    "DataError",
    "Dataset",
    "Evaluation",
    "ImageModel",
    "ImageResult",
    "LirpaPatchError",
    "LoadedModel",
    "Locations",
    "ModelError",
    "PatchPerturbation",
    "PatchShape",
    "PatchThreat",
    "PixelDomain",
    "SparsePerturbation",
    "SparseThreat",
    "Threat",
    "TrainConfig",
    "Trainer",
    "UsageError",
    "__version__",
    "all_locations",
    "attack",
    "attack_patch",
    "attack_rows",
    "attack_sparse",
    "auto_lirpa_version",
    "bound_model",
    "bounded_module",
    "certify",
    "certify_sparse",
    "consistency_violations",
    "custom_ops",
    "evaluate",
    "evaluate_patch",
    "evaluate_sparse",
    "image_model",
    "load_dataset",
    "load_model",
    "lower_margins",
    "make_shape",
    "margin_spec",
    "sparse_lower_margins",
]
