"""``lirpa-patch certify``: certify a model's images against every patch location.

Flow: parse and check options (cheap, before anything is loaded) -> load the
data -> build the patch shape(s) and their locations -> load the model and wrap
it for images in [0, 1] -> cross-check against onnxruntime -> certify with the
engine (progress on stderr) -> write the JSON report (:mod:`lirpa_patch.report`) ->
print the results table (:mod:`lirpa_patch_cli.render`) on stdout.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Optional, Sequence

import click
from rich.markup import escape

from ._console import parse_bytes, InputError, console, err_console, library_warnings_silenced, parse_floats, parse_shape

_SHAPE_HELP = (
    "Patch shape: square, rectangle, line, hline, vline, diamond, parallelogram, rectangle:HxW, "
    "a .npy file holding a 2-D boolean mask, or 'all' (every shape of the paper's Table 5: "
    "square, rectangle, line, diamond, parallelogram). Every named shape gets the pixel count "
    "of --patch (or the closest the shape allows)."
)
_CHUNK_HELP = (
    "(image, location) rows per bound computation: the one memory knob; memory grows linearly "
    "with it. IBP keeps a few activations per row; CROWN also keeps linear bounds of every layer "
    "in terms of the input per row, far more, so it defaults lower. Lower it if memory runs out."
)


def _load_mask(path: Path):
    """A 2-D boolean mask from a .npy file (0/1 integers or floats accepted)."""
    import numpy as np

    from lirpa_patch.errors import DataError, UsageError

    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    try:
        mask = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, ... on a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read mask file {path} ({reason}); expected a .npy boolean array") from None
    if not isinstance(mask, np.ndarray):
        raise DataError(f"mask file {path} holds several arrays; expected one 2-D boolean .npy array")
    if mask.ndim != 2:
        raise UsageError(f"mask file {path} holds an array of shape {mask.shape}; a 2-D (h, w) mask is needed")
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
            raise UsageError(f"mask file {path} must hold booleans or 0/1 values, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _resolve_shapes(shape: str) -> tuple[list, Optional[str]]:
    """What ``--shape`` names: shape names (built later, on the image size) or a mask; and the mask file.

    Nothing is allocated here beyond the mask file's own array.
    """
    from lirpa_patch.errors import UsageError
    from lirpa_patch.shapes import SHAPE_NAMES, TRANSFER_SHAPES

    text = shape.strip()
    key = text.lower()
    if key == "all":
        return list(TRANSFER_SHAPES), None
    if key in SHAPE_NAMES or key.startswith("rectangle:"):
        return [key], None
    if key.endswith(".npy") or Path(text).expanduser().is_file():
        path = Path(text).expanduser()
        return [_load_mask(path)], str(path)
    raise UsageError(
        f"unknown shape {shape!r}; choose one of {', '.join(SHAPE_NAMES)}, rectangle:HxW, all, "
        "or a .npy mask file", param="shape"
    )


def _check_device(device: str) -> str:
    import torch

    from lirpa_patch.errors import UsageError

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    return device


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _status(message: str, enabled: bool):
    """A transient spinner on stderr while loading (only on a terminal, not with --quiet)."""
    return err_console.status(message) if enabled else contextlib.nullcontext()


@click.command("certify", context_settings={"show_default": True})
@click.argument("model", metavar="MODEL")
@click.option("--patch", "patch", default="2x2", metavar="HxW", help="Patch size HxW; its area is the attacker's pixel budget.")
@click.option("--shape", "shape", default="square", metavar="SHAPE", help=_SHAPE_HELP)
@click.option("--data", default="sample", metavar="SOURCE", help="'sample' (bundled MNIST digits), an .npz file (x, y), "
              "an MNIST IDX directory or a CIFAR-10 batches directory (append :train/:test to pick a split).")
@click.option("--start", type=int, default=0, help="First image of the data to certify.")
@click.option("--num", type=int, default=None, show_default="to the end", help="Number of images to certify.")
@click.option("--sparse", "sparse", type=click.IntRange(min=1), default=None, metavar="K",
              help="Certify against any K changed pixels (all channels of a pixel count as one) "
              "instead of a patch; --patch/--shape do not apply.")
@click.option("--method", type=click.Choice(["ibp", "crown", "alpha-crown"], case_sensitive=False), default="ibp",
              help="Bound method: IBP (fast, loose); crown: IBP on every location, then CROWN only where IBP "
              "cannot certify; alpha-crown: then alpha-CROWN (optimized CROWN) only where CROWN cannot. "
              "Same certified images as the strongest method on every location.")
@click.option("--exhaustive", is_flag=True, default=False,
              help="With crown/alpha-crown: keep bounding an image's locations after one failed the strongest "
              "method (every location's margin, e.g. for heatmaps). By default such an image is settled at once "
              "(not certified).")
@click.option("--intermediate", type=click.Choice(["auto", "crown", "ibp"], case_sensitive=False), default="auto",
              help="How CROWN bounds the hidden layers: crown (full CROWN), ibp (CROWN-IBP: much faster on "
              "convolutional nets, looser), or auto (measured per model: ibp only where full CROWN would take "
              "over 2 min per image and CROWN-IBP stays close). The report says which was used.")
@click.option("--input-shape", "input_shape", default=None, metavar="DIMS",
              help="Per-sample input shape of the model, batch dim excluded (e.g. 784x1, 1x28x28). "
              "Read from ONNX files; required for .pt/.pth models.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc", "flat"], case_sensitive=False), default=None,
              show_default="inferred from the input shape",
              help="How images (N, C, H, W) are laid out for the model.")
@click.option("--mean", default=None, metavar="M[,M,M]", help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465 "
              "(the model sees (x - mean) / std with x in [0, 1]); give --std too.")
@click.option("--std", default=None, metavar="S[,S,S]", help="Per-channel std the model expects, e.g. 0.2471,0.2435,0.2616; "
              "give --mean too (--mean 0 --std S only divides, --mean M --std 1 only subtracts).")
@click.option("--max-memory", "max_memory", default="1G", metavar="SIZE",
              help="Memory for the working tensors of one bound computation (e.g. 512M, 2G); sets the rows "
              "per call from the model's activation sizes.")
@click.option("--chunk", type=click.IntRange(min=1), default=None, show_default="sized by --max-memory",
              help=_CHUNK_HELP)
@click.option("--device", type=click.Choice(["cpu", "cuda"], case_sensitive=False), default="cpu",
              help="Where to compute the bounds.")
@click.option("--seed", type=int, default=0, help="Random seed (recorded in the report).")
@click.option("--output", "-o", "output", default=None, metavar="PATH",
              help="Write the JSON report here: a regular file atomically, a symlink through to its target, "
              "a device or FIFO into it. A path that is an input of the run (MODEL, a --data file, a --shape "
              "mask) is refused.")
@click.option("--no-check", "no_check", is_flag=True, default=False,
              help="Skip cross-checking an ONNX model against onnxruntime on the images before certifying.")
@click.option("--quiet", "-q", is_flag=True, default=False,
              help="No progress bar or status messages on stderr (the results table still goes to stdout).")
def certify(
    model: str,
    patch: str,
    shape: str,
    data: str,
    start: int,
    num: Optional[int],
    sparse: Optional[int],
    method: str,
    exhaustive: bool,
    intermediate: str,
    input_shape: Optional[str],
    layout: Optional[str],
    mean: Optional[str],
    std: Optional[str],
    max_memory: str,
    chunk: Optional[int],
    device: str,
    seed: int,
    output: Optional[str],
    no_check: bool,
    quiet: bool,
) -> None:
    """Certify MODEL against adversarial patches at every location of every image.

    MODEL is an ONNX file, a TorchScript file or a pickled torch.nn.Module (.pt/.pth).
    An image is certified when, for every placement of the patch and every value of
    its pixels in [0, 1], the certified lower bound of logit[label] - logit[other]
    is >= 0 for every other class.

    \b
    Examples:
      lirpa-patch certify net.onnx --patch 2x2 --shape diamond --data mnist_test/ -o report.json
      lirpa-patch certify resnet.onnx --data cifar/ --num 100 --mean 0.4914,0.4822,0.4465 \\
          --std 0.2471,0.2435,0.2616 --patch 5x5 --shape all
    """
    ctx = click.get_current_context()
    if sparse is not None:
        for name in ("patch", "shape"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--sparse cannot be combined with --{name} (a sparse attack has no patch)")
    if not Path(model).expanduser().exists():  # before importing torch: a typo fails at once
        raise InputError(f"model file not found: {model}")
    with library_warnings_silenced():
        _run(
            model=model, patch=patch, shape=shape, data=data, start=start, num=num, sparse=sparse,
            method=method.lower(), exhaustive=exhaustive, intermediate=intermediate.lower(),
            input_shape=parse_shape(input_shape, "--input-shape"), layout=layout.lower() if layout else None,
            mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), chunk=chunk,
            max_memory=parse_bytes(max_memory, "--max-memory"),
            device=device.lower(), seed=seed, output=output, check=not no_check, quiet=quiet,
        )


certify.param_flags = {"size": "--patch", "k": "--sparse", "chunk_size": "--chunk", "source": "--data",
                       "model": "MODEL"}


def _run(
    *,
    model: str,
    patch: str,
    shape: str,
    data: str,
    start: int,
    num: Optional[int],
    sparse: Optional[int],
    method: str,
    exhaustive: bool,
    intermediate: str,
    input_shape: Optional[tuple[int, ...]],
    layout: Optional[str],
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    max_memory: int,
    chunk: Optional[int],
    device: str,
    seed: int,
    output: Optional[str],
    check: bool,
    quiet: bool,
) -> None:
    from lirpa_patch import report
    from lirpa_patch.data import load_dataset, source_files
    from lirpa_patch.domain import check_normalization
    from lirpa_patch.engine import bound_model, certify as certify_images
    from lirpa_patch.locations import all_locations
    from lirpa_patch.models import check_against_onnxruntime, image_model, load_model
    from lirpa_patch.outputs import check_outputs
    from lirpa_patch.shapes import check_pixels, make_shape
    from lirpa_patch.spec import check_labels
    from lirpa_patch.threats.sparse import check_budget

    from . import render

    # 1. options that need nothing loaded; an output that is an input of the run is refused here
    size = check_pixels(patch)  # a patch no image can hold fails before the data is read
    shape_specs, mask_file = _resolve_shapes(shape) if sparse is None else ([], None)
    check_normalization(mean, std)  # both or neither
    device = _check_device(device)
    if output is not None:
        check_outputs({"output": output}, {"model": model, "data": source_files(data), "shape": mask_file})
        report.check_writable(output)
    _seed_everything(seed)
    interactive = not quiet and err_console.is_terminal

    # 2. data; then the patch shapes and locations, checked against its image size before allocating
    dataset = load_dataset(data, start=start, num=num)
    image_shape = tuple(int(d) for d in dataset.images.shape[1:])
    if sparse is None:
        shapes = [make_shape(spec, size, image_size=image_shape[1:]) for spec in shape_specs]
        locations = [all_locations(s, image_shape[1:]) for s in shapes]  # UsageError if a patch does not fit
    else:
        check_budget(sparse, image_shape)
        shapes, locations = [], []

    # 3. the model, wrapped to take images (N, C, H, W) in [0, 1]
    with _status(f"Loading {escape(Path(model).name)}...", interactive):
        loaded = load_model(model, input_shape=input_shape)
        net = image_model(loaded, image_shape=image_shape, layout=layout, mean=mean, std=std)
    if loaded.num_classes is not None:
        check_labels(dataset.labels, loaded.num_classes, name=dataset.name, indices=dataset.indices)
    max_diff: Optional[float] = None
    if check and loaded.onnx_path is not None:
        with _status("Cross-checking the model against onnxruntime...", interactive):
            max_diff = check_against_onnxruntime(net, loaded.onnx_path, dataset.images)

    # 4. certify: every patch shape, or the sparse threat
    net = net.to(device).eval()
    with _status("Building the bounded model...", interactive):
        bounded = bound_model(net, image_shape, device)
    results = {}
    indices = dataset.indices.tolist()
    with render.CertifyProgress(err_console, enabled=interactive) as progress:
        common = dict(method=method, chunk_size=chunk, max_memory=max_memory, device=device, indices=indices,
                      bounded=bounded, exhaustive=exhaustive, intermediate=intermediate)
        if sparse is not None:
            results["sparse"] = certify_images(net, dataset.images, dataset.labels, k=sparse,
                                               progress=progress.task("Certifying"), **common)
        for patch_shape, locs in zip(shapes, locations):
            label = patch_shape.name if len(shapes) > 1 else "Certifying"
            results[patch_shape.name] = certify_images(
                net, dataset.images, dataset.labels, shape=patch_shape, locations=locs,
                progress=progress.task(label), **common,
            )

    # 5. report and tables
    run = report.RunInfo.of(
        model, dataset, net=net, num_classes=loaded.num_classes, data=data, start=start, num=num,
        patch=None if sparse is not None else size, sparse_k=sparse, method=method,
        chunk=next(iter(results.values())).chunk_size, device=device, seed=seed,
        onnxruntime_max_abs_diff=max_diff, mask_file=mask_file,
    )
    if len(results) == 1:
        doc = report.build_report(next(iter(results.values())), run)
        table = render.summary_table(doc["summary"])
    else:
        doc = report.build_transfer_report(results, run)
        table = render.transfer_table(doc)
    if output is not None:
        written = report.write_report(output, doc)
    console.print(table)
    if output is not None and not quiet:
        err_console.print(f"Report written to {written}", highlight=False, markup=False, soft_wrap=True)


COMMANDS = [certify]
