"""What ``certify``, ``attack`` and ``evaluate`` share: the model, data and threat options,
and turning them into loaded data, a wrapped model and a list of threats to run.

Flow of every such command: :func:`parse_threats` (cheap, nothing loaded) ->
:func:`check_paths` (an output is never an input; outputs writable) ->
:func:`load` (data, model, onnxruntime cross-check) -> :func:`threat_items` (the patch
shapes on the image size, or the sparse budgets) -> the command's own work.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import click
from rich.markup import escape

from . import _choices as choices
from ._console import InputError, err_console, parse_bytes, parse_floats, parse_shape
from ._progress import Once
from .launch import NPROC_HELP, world_from_env

SHAPE_HELP = (
    "Patch shape: square, rectangle, line, hline, vline, diamond, parallelogram, rectangle:HxW, "
    "a .npy file holding a 2-D boolean mask, or 'all' (every shape of the paper's Table 5: "
    "square, rectangle, line, diamond, parallelogram). Every named shape has exactly the pixel "
    "count of --patch; 'rectangle' is every h x w with at least that many (an image must hold "
    "against all of them)."
)
CHUNK_HELP = (
    "Rows per bound computation: the one memory knob; memory grows linearly with it. IBP keeps a "
    "few activations per row; CROWN also keeps linear bounds of every layer in terms of the input "
    "per row, far more, so it defaults lower. Lower it if memory runs out."
)


# --------------------------------------------------------------------------- options


def model_data_options(*, method: bool = True, nproc: bool = False) -> Callable:
    """The options every model command takes, in help order (``method``: the bound method;
    ``nproc``: ``--nproc N``, for a command that shares its images between processes)."""

    def decorate(f: Callable) -> Callable:
        options = [
            click.argument("model", metavar="MODEL"),
            click.option("--patch", "patch", default="2x2", metavar="HxW[,HxW...]",
                         help="Patch size HxW (its area is the attacker's pixel budget); several, comma-"
                         "separated, sweep the sizes in one run (e.g. 1x1,2x2,3x3,5x5)."),
            click.option("--shape", "shape", default="square", metavar="SHAPE", help=SHAPE_HELP),
            click.option("--sparse", "sparse", default=None, metavar="K[,K...]",
                         help="Any K changed pixels (all channels of a pixel count as one) instead of a "
                         "patch; several, comma-separated, sweep the budgets (e.g. 1,2,4,8). --patch/--shape "
                         "do not apply."),
            click.option("--data", default="sample", metavar="SOURCE",
                         help="'sample' (2,000 bundled MNIST test digits; sample:train: 5,000 training digits), "
                         "an .npz file (x, y), an MNIST IDX directory or a CIFAR-10 batches directory (its test "
                         "split; append :train/:test to pick a split)."),
            click.option("--start", type=int, default=0, help="First image of the data."),
            click.option("--num", type=int, default=None, show_default="to the end", help="Number of images."),
        ]
        if method:
            options.append(click.option(
                "--method", type=click.Choice(choices.METHODS, case_sensitive=False), default="ibp",
                help="Bound method: ibp (fast, loose); crown: IBP on every location, then CROWN only where IBP "
                "cannot certify; alpha-crown: then alpha-CROWN (optimized CROWN) only where CROWN cannot. "
                "Same certified images as the strongest method on every location."))
        options += [
            click.option("--input-shape", "input_shape", default=None, metavar="DIMS",
                         help="Per-sample input shape of the model, batch dim excluded (e.g. 784x1, 1x28x28). "
                         "Read from ONNX files; required for .pt/.pth models."),
            click.option("--layout", type=click.Choice(choices.LAYOUTS, case_sensitive=False), default=None,
                         show_default="inferred from the input shape",
                         help="How images (N, C, H, W) are laid out for the model."),
            click.option("--mean", default=None, metavar="M[,M,M]",
                         help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465 (the model sees "
                         "(x - mean) / std with x in [0, 1]); give --std too."),
            click.option("--std", default=None, metavar="S[,S,S]",
                         help="Per-channel std the model expects, e.g. 0.2471,0.2435,0.2616; give --mean too "
                         "(--mean 0 --std S only divides, --mean M --std 1 only subtracts)."),
            click.option("--max-memory", "max_memory", default=None, metavar="SIZE",
                         show_default="1G; with --device cuda half the GPU's free memory",
                         help="Memory for the working tensors of one bound computation (e.g. 512M, 2G); sets "
                         "the rows per call from the model's activation sizes."),
            click.option("--chunk", type=click.IntRange(min=1), default=None, show_default="sized by --max-memory",
                         help=CHUNK_HELP),
            click.option("--device", type=click.Choice(choices.DEVICES, case_sensitive=False), default="cpu",
                         help="Where to compute" + (" (cuda: the process's own GPU under torchrun or --nproc)."
                                                    if nproc else ".")),
            *([click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N", show_default="1",
                            help=NPROC_HELP)] if nproc else []),
            click.option("--seed", type=int, default=0, help="Random seed (recorded in the report)."),
            click.option("--threads", type=click.IntRange(min=1), default=None, show_default="torch's default",
                         help="CPU threads torch may use (1 is often fastest on a small or busy machine)."),
            click.option("--output", "-o", "output", default=None, metavar="PATH",
                         help="Write the JSON report here: a regular file atomically, a symlink through to its "
                         "target, a device or FIFO into it. A path that is an input of the run (MODEL, a --data "
                         "file, a --shape mask) is refused."),
            click.option("--no-check", "no_check", is_flag=True, default=False,
                         help="Skip cross-checking an ONNX model against onnxruntime on the images first."),
            click.option("--quiet", "-q", is_flag=True, default=False,
                         help="No progress bar or status messages on stderr (the results table still goes to "
                         "stdout)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


PARAM_FLAGS = {"size": "--patch", "k": "--sparse", "chunk_size": "--chunk", "source": "--data", "model": "MODEL",
               "max_memory": "--max-memory"}
"""Library parameter -> flag, for the commands built on :func:`model_data_options`."""


# --------------------------------------------------------------------------- threats


@dataclass
class Threats:
    """The threats asked for: patch sizes with shape specs, or sparse budgets."""

    sizes: list[tuple[int, int]] = field(default_factory=list)
    shape_specs: list[Any] = field(default_factory=list)
    mask_file: Optional[str] = None
    ks: list[int] = field(default_factory=list)

    @property
    def sparse(self) -> bool:
        return bool(self.ks)

    @property
    def sweep(self) -> bool:
        return len(self.sizes) > 1 or len(self.ks) > 1


@dataclass
class ThreatItem:
    """One threat to run: a patch (size and built shape) or a sparse budget."""

    label: str  # "2x2 square", "k=4"
    value: str  # "2x2" or "4": the swept value
    size: Optional[tuple[int, int]] = None
    shape: Any = None  # PatchShape
    k: Optional[int] = None
    threat: Any = None  # the lirpa_patch Threat, prepared for the image size


def _load_mask(path: Path):
    """A 2-D boolean mask from a .npy file (0/1 integers or floats accepted)."""
    import numpy as np

    from lirpa_patch._messages import first_line
    from lirpa_patch.errors import DataError, UsageError

    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    try:
        mask = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, ... on a bad file
        raise DataError(f"cannot read mask file {path} ({first_line(exc)}); expected a .npy boolean array") from None
    if not isinstance(mask, np.ndarray):
        raise DataError(f"mask file {path} holds several arrays; expected one 2-D boolean .npy array")
    if mask.ndim != 2:
        raise UsageError(f"mask file {path} holds an array of shape {mask.shape}; a 2-D (h, w) mask is needed")
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
            raise UsageError(f"mask file {path} must hold booleans or 0/1 values, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def resolve_shapes(shape: str) -> tuple[list, Optional[str]]:
    """What ``--shape`` names: shape names (built later, on the image size) or a mask; and the mask file."""
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


def _values(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def parse_threats(patch: str, shape: str, sparse: Optional[str]) -> Threats:
    """``--patch``/``--shape`` or ``--sparse`` as :class:`Threats` (comma lists sweep); nothing is loaded."""
    from lirpa_patch.shapes import check_pixels

    ctx = click.get_current_context()
    if sparse is not None:
        for name in ("patch", "shape"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--sparse cannot be combined with --{name} (a sparse attack has no patch)")
        ks = []
        for value in _values(sparse) or [sparse]:
            try:
                k = int(value)
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a whole number of pixels", param_hint="--sparse") from None
            if k < 1:
                raise click.BadParameter(f"{value!r}: the pixel budget must be at least 1", param_hint="--sparse")
            if k not in ks:
                ks.append(k)
        return Threats(ks=ks)
    sizes = []
    for value in _values(patch) or [patch]:
        size = check_pixels(value)  # a patch no image can hold fails before the data is read
        if size not in sizes:
            sizes.append(size)
    specs, mask_file = resolve_shapes(shape)
    return Threats(sizes=sizes, shape_specs=specs, mask_file=mask_file)


def threat_items(threats: Threats, image_shape: Sequence[int]) -> list[ThreatItem]:
    """The threats to run on images ``(C, H, W)``: sizes x shapes (checked to fit), or budgets."""
    from lirpa_patch.shapes import make_shape
    from lirpa_patch.threats import PatchThreat, SparseThreat
    from lirpa_patch.threats.sparse import check_budget

    if threats.sparse:
        return [ThreatItem(label=f"k={check_budget(k, image_shape)}", value=str(k), k=k, threat=SparseThreat(k))
                for k in threats.ks]
    items = []
    for size in threats.sizes:
        for spec in threats.shape_specs:
            shape = make_shape(spec, size, image_size=image_shape[1:])
            value = f"{size[0]}x{size[1]}"
            threat = PatchThreat(size, shape)
            threat.prepare(image_shape[1:])
            items.append(ThreatItem(label=f"{value} {shape.name}", value=value, size=size, shape=shape, threat=threat))
    return items


# --------------------------------------------------------------------------- loading


def check_device(device: str) -> str:
    import torch

    from lirpa_patch.errors import UsageError

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def status(message: str, enabled: bool):
    """A transient spinner on stderr while loading (only on a terminal, not with --quiet)."""
    return err_console.status(message) if enabled else contextlib.nullcontext()


def single_process(command: str) -> None:
    """A command that does not share its images between processes refuses to run in several."""
    if world_from_env() > 1:
        raise click.UsageError(
            f"{command} runs in one process: the images are not split between processes, each would repeat the "
            "whole run (run it without torchrun; certify and train take several)"
        )


def check_model_exists(model: str) -> None:
    """Before importing torch: a typo in MODEL fails at once (exit 1)."""
    if not Path(model).expanduser().exists():
        raise InputError(f"model file not found: {model}")


_WHAT = {"output": "the report", "html": "the HTML report", "table": "the table"}

_FOLDER_WRITES = {"heatmaps": (".png",), "plots": (".png",), "save_adversarial": (".png", ".npz")}
"""The kinds of file each folder option writes (names chosen from the run: image indices, labels)."""


def _check_not_in_folders(files: Mapping[str, Optional[str]], folders: Mapping[str, Optional[str]]) -> None:
    """A file output is not where a folder output of the run may write a file of its kind (a picture
    named after an image and a label could replace the report)."""
    from lirpa_patch.errors import UsageError

    for folder_name, folder in folders.items():
        if folder is None:
            continue
        root = Path(folder).expanduser().resolve()
        kinds = _FOLDER_WRITES.get(folder_name, ())
        for name, path in files.items():
            if path is None:
                continue
            target = Path(path).expanduser().resolve()
            if target.parent == root and target.suffix.lower() in kinds:
                raise UsageError(
                    f"{name} {path} is inside {folder_name} {folder}, where this run writes {'/'.join(kinds)} files "
                    "that could replace it (choose a path outside that folder or another suffix)",
                    param=name, related=(folder_name,))


def check_paths(files: Mapping[str, Optional[str]], folders: Mapping[str, Optional[str]], *, model: str, data: str,
                mask_file: Optional[str]) -> None:
    """Outputs (files and folders, by parameter name) are no inputs of the run, and writable; nothing written."""
    from lirpa_patch import outputs
    from lirpa_patch.data import source_files

    outputs.check_outputs({**files, **folders}, {"model": model, "data": source_files(data), "shape": mask_file})
    _check_not_in_folders(files, folders)
    for name, path in files.items():
        if path is not None:
            outputs.check_writable(path, what=_WHAT.get(name, f"the {name.replace('_', ' ')} file"))
    for name, path in folders.items():
        if path is not None:
            outputs.output_folder(path, create=False, what=f"the {name.replace('_', ' ')} folder")


@dataclass
class Loaded:
    """The data and the model of a run, ready to certify or attack."""

    dataset: Any
    image_shape: tuple[int, int, int]
    loaded: Any  # LoadedModel
    net: Any  # ImageModel on the device, eval mode
    max_diff: Optional[float]
    interactive: bool
    quiet: bool = False

    @property
    def indices(self) -> list[int]:
        return self.dataset.indices.tolist()

    @property
    def lines(self) -> bool:
        """Progress as periodic plain lines: status messages wanted, but stderr is no terminal (a log)."""
        return not self.quiet and not self.interactive


def header(run: Loaded) -> Once:
    """The run header for stderr (nothing with --quiet): which images are certified, and their split;
    printed by the progress displays when the work starts, or by calling it."""
    from .render import data_header

    return Once(err_console, None if run.quiet else data_header(run.dataset))


def load(*, model: str, data: str, start: int, num: Optional[int], input_shape: Optional[str], layout: Optional[str],
         mean: Optional[str], std: Optional[str], device: str, check: bool, quiet: bool,
         threads: Optional[int] = None) -> Loaded:
    """Load the data and the model (wrapped to take images in [0, 1]) and cross-check it with onnxruntime.

    ``threads``: CPU threads torch may use (None: torch's default).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    from lirpa_patch.devices import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed memory (no page faults per bound call)
    from lirpa_patch.data import load_dataset
    from lirpa_patch.domain import check_normalization
    from lirpa_patch.models import check_against_onnxruntime, image_model, load_model
    from lirpa_patch.spec import check_labels

    mean_values, std_values = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    check_normalization(mean_values, std_values)  # both or neither
    interactive = not quiet and err_console.is_terminal
    dataset = load_dataset(data, start=start, num=num)
    image_shape = tuple(int(d) for d in dataset.images.shape[1:])
    with status(f"Loading {escape(Path(model).name)}...", interactive):
        loaded = load_model(model, input_shape=parse_shape(input_shape, "--input-shape"))
        net = image_model(loaded, image_shape=image_shape, layout=layout.lower() if layout else None,
                          mean=mean_values, std=std_values)
    if loaded.num_classes is not None:
        check_labels(dataset.labels, loaded.num_classes, name=dataset.name, indices=dataset.indices)
    max_diff: Optional[float] = None
    if check and loaded.onnx_path is not None:
        with status("Cross-checking the model against onnxruntime...", interactive):
            max_diff = check_against_onnxruntime(net, loaded.onnx_path, dataset.images)
    net = net.to(device).eval()
    return Loaded(dataset, image_shape, loaded, net, max_diff, interactive, quiet)  # type: ignore[arg-type]


def run_info(run: Loaded, *, model: str, data: str, start: int, num: Optional[int], item: Optional[ThreatItem],
             method: str, chunk: Optional[int], device: str, seed: int, mask_file: Optional[str],
             world_size: int = 1):
    """The report's :class:`~lirpa_patch.report.RunInfo` for one threat item (None: the run as a whole)."""
    from lirpa_patch import report

    return report.RunInfo.of(
        model, run.dataset, net=run.net, num_classes=run.loaded.num_classes, data=data, start=start, num=num,
        patch=item.size if item is not None and item.size is not None else None,
        sparse_k=item.k if item is not None else None, method=method, chunk=chunk, device=device, seed=seed,
        onnxruntime_max_abs_diff=run.max_diff, mask_file=mask_file, world_size=world_size,
    )


def parse_memory(value: Optional[str]) -> Optional[int]:
    """``--max-memory`` in bytes; None when not given (see :func:`memory`)."""
    return parse_bytes(value, "--max-memory") if value is not None else None


def memory(value: Optional[int], device) -> int:
    """The bytes one bound computation may use: ``--max-memory``, else half the GPU's free memory
    (measure with the model on the GPU), else the engine's default (1 GiB)."""
    from lirpa_patch.devices import memory_budget
    from lirpa_patch.engine import DEFAULT_MAX_MEMORY

    if value is not None:
        return value
    return memory_budget(device) or DEFAULT_MAX_MEMORY


# --------------------------------------------------------------------------- attacks


def check_candidates(value: Optional[str]) -> Any:
    if value is None:
        return None
    if value.strip().lower() == "all":
        return "all"
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'all'", param_hint="--candidates") from None
    if count < 0:
        raise click.BadParameter(f"{value!r} must be >= 0", param_hint="--candidates")
    return count


def attack_options(*, worst_default: int) -> Callable:
    """The attack's options (``attack`` and ``evaluate``); unset ones keep the library's defaults."""

    def decorate(f: Callable) -> Callable:
        options = [
            click.option("--steps", type=click.IntRange(min=0), default=None, show_default="20",
                         help="Sign-gradient steps per restart (patch); re-selection rounds (sparse)."),
            click.option("--restarts", type=click.IntRange(min=1), default=None, show_default="3",
                         help="Patch: starting points per location (best sweep content, the clean image as in the "
                         "paper's IFGSM, then random corners and noise); sparse: greedy pass + random starts."),
            click.option("--step-size", "step_size", type=click.FloatRange(min=0, min_open=True), default=None,
                         show_default="0.25", help="First step as a fraction of each channel's range (shrinks to a "
                         "tenth of it)."),
            click.option("--candidates", default=None, metavar="N|all", show_default="16",
                         help="Patch: locations per image attacked in depth after a sweep of every location (those "
                         "the sweep finds weakest); 'all' attacks every location in depth. Sparse: pixels evaluated "
                         "per greedy step."),
            click.option("--loss", type=click.Choice(choices.LOSSES, case_sensitive=False), default=None,
                         show_default="margin", help="What the attack minimises: the margin logit[label] - max "
                         "other logit, or the paper's cross-entropy (maximised)."),
            click.option("--worst", "worst", type=click.IntRange(min=0), default=worst_default,
                         help="Patch: also attack in depth, per image, the N locations with the worst certified "
                         "margin (certifies first; 0: none)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def attack_kwargs(item: ThreatItem, *, steps, restarts, step_size, candidates, loss, chunk) -> dict:
    """Keyword arguments of attack_patch / attack_sparse from the options that were given."""
    out: dict[str, Any] = {}
    if steps is not None:
        out["steps"] = steps
    if restarts is not None:
        out["restarts"] = restarts
    if loss is not None:
        out["loss"] = loss.lower()
    if chunk is not None:
        out["chunk_size"] = chunk
    count = check_candidates(candidates)
    if item.k is None:
        if step_size is not None:
            out["step_size"] = step_size
        if count is not None:
            out["candidates"] = None if count == "all" else count
    elif count is not None:
        if count == "all" or count < 1:
            raise click.BadParameter("for --sparse, a number of pixels >= 1", param_hint="--candidates")
        out["candidates"] = count
    return out
