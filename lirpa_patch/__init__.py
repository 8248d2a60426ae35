"""lirpa-patch: certified defenses against adversarial patches and sparse attacks.

An auto_LiRPA plugin. Public API::

    from lirpa_patch import PatchPerturbation, SparsePerturbation, certify

Importing this package applies the small compatibility shims auto_LiRPA 0.3
needs on torch 2.x / numpy 2 (see ``lirpa_patch._compat``).
"""

from __future__ import annotations

import importlib
import logging

from . import _compat

__version__ = "0.1.0"

# torch logs a CUDA_HOME notice when auto_LiRPA imports cpp_extension on a
# machine without CUDA; it is noise for our users.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

with _compat.quiet_import():
    _compat.apply()
    try:
        import auto_LiRPA  # noqa: F401
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
    # Plugin bound operators for SparsePerturbation: registered up front so that
    # BoundedModules built before a SparsePerturbation exists still carry them. They
    # defer to auto_LiRPA's stock operators whenever the input is not sparse.
    from . import bound_ops as _bound_ops

    _bound_ops.register()

# Public name -> module that defines it. Imported lazily so `import lirpa_patch`
# stays fast and the CLI starts quickly.
_PUBLIC = {
    "PatchPerturbation": "perturbations",
    "SparsePerturbation": "sparse",
    "certify_sparse": "sparse",
    "sparse_lower_margins": "sparse",
    "PatchShape": "shapes",
    "make_shape": "shapes",
    "Locations": "locations",
    "all_locations": "locations",
    "PixelDomain": "domain",
    "certify": "certify",
    "CertifyResult": "certify",
    "ImageResult": "certify",
    "margin_spec": "spec",
    "load_dataset": "data",
    "Dataset": "data",
    "load_model": "models",
    "ImageModel": "models",
    "Trainer": "train",
    "TrainConfig": "train",
    "LirpaPatchError": "errors",
    "UsageError": "errors",
    "DataError": "errors",
    "ModelError": "errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lirpa_patch' has no attribute {name!r}")


def auto_lirpa_version() -> str:
    """The installed auto_LiRPA version string."""
    return getattr(auto_LiRPA, "__version__", "unknown")
