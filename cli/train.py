"""``lirpa-patch train``: certified training against patches, then ONNX export.

Flow: parse options -> refuse outputs that are inputs of the run
(:func:`lirpa_patch.outputs.check_outputs`) -> split the data into training and
validation images (:func:`lirpa_patch.train.train_val_split`; which images each phase
uses is printed) -> pick the dataset preset and its normalization
(:mod:`lirpa_patch.train.presets`) -> build the architecture with the normalization in
front -> train with
:class:`lirpa_patch.train.Trainer` (a live table per epoch on stdout, a progress
line for the current epoch, metrics to a JSONL/CSV file, a checkpoint after
every epoch) -> certify the whole validation split with IBP over every location
-> export ONNX (normalization folded in, checked against onnxruntime).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import click

from . import _choices as choices
from ._console import InputError, console, err_console, library_warnings_silenced, param_as, parse_floats
from ._progress import ProgressLines, clock, remaining
from .launch import NPROC_HELP, is_primary, launch_or_none

if TYPE_CHECKING:  # --help imports no torch
    from lirpa_patch.train.plan import Warmup

_STRATEGY_HELP = (
    "Which locations the loss bounds: 'all' (every location, eq. 11-12), 'random' (--patches "
    "uniformly random locations per image, eq. 13-14), 'guided' (a U-net predicts every "
    "location's margin; --patches locations per image, spread over the labels, sampled from "
    "softmax(-prediction/T), eq. 15-18), 'guided-per-label' (--patches locations for every other "
    "label), 'pool' (all locations, adjacent intervals pooled after the layers of --pool)."
)
_PATCHES_HELP = (
    "K: locations per image: random, as the paper's Random(K); guided, as the paper's Guided(10) "
    "and Guided(20): K // (classes - 1) per label, the rest to the labels predicted weakest; "
    "guided-per-label: K per label, so K x (classes - 1) per image."
)


def _parse_pool(value: str) -> tuple[int, ...]:
    if value.strip().lower() == "auto":
        return ()
    try:
        pool = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of window sizes", param_hint="--pool") from None
    if not pool or any(p < 1 for p in pool):
        raise click.BadParameter(f"{value!r}: window sizes must be positive", param_hint="--pool")
    return pool


def _scaled(preset: Optional["Warmup"], epochs: int) -> str:
    """The header's note on a warm-up scaled to ``--epochs`` (:func:`lirpa_patch.train.plan.scaled_warmup`)."""
    if preset is None:
        return ""
    return f" (scaled from {preset.warmup_start}+{preset.warmup} of {preset.epochs} to --epochs {epochs})"


class _Display:
    """The live view: one table row per epoch (printed as it completes) and a progress line with
    the batches done and the ETA of the epoch and of the run; when stderr is no terminal
    (``lines``), a plain progress line on it now and then instead
    (:class:`~lirpa_patch_cli._progress.ProgressLines`)."""

    _COLUMNS = [
        ("epoch", 7), ("str.", 4), ("lr", 7), ("loss", 6), ("nat", 6), ("U-net", 6),
        ("acc", 6), ("cert*", 6), ("val acc", 7), ("val cert", 8), ("time", 5),
    ]

    def __init__(self, enabled: bool, epochs: int, strategy: str, *, lines: bool = False) -> None:
        from rich.live import Live
        from rich.text import Text

        self.enabled = enabled
        self.epochs = epochs
        self.strategy = strategy
        self._text = Text("")
        self._live = Live(self._text, console=console, transient=True, refresh_per_second=4) if enabled else None
        self._last = 0.0
        self._lines = ProgressLines(err_console, enabled=lines)
        self._first_epoch: Optional[int] = None  # the epoch the run starts at (a resumed run: after 1)
        self._epoch_started = time.monotonic()

    def _etas(self, event) -> tuple[str, str]:
        """The ETA of the epoch and of the run, at the rate so far (``"-"`` before the first batch)."""
        now = time.monotonic()
        epoch = remaining(now - self._epoch_started, event.batch, event.num_batches)
        first = self._first_epoch or 0
        done = (event.epoch - 1 - first) * event.num_batches + event.batch
        run = remaining(now - self._lines.started, done, (event.epochs - first) * event.num_batches)
        return tuple("-" if eta is None else clock(eta) for eta in (epoch, run))  # type: ignore[return-value]

    def _table(self, rows: list[list[str]], header: bool):
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_header=header, pad_edge=False, show_edge=False, padding=0)
        for name, width in self._COLUMNS:
            table.add_column(name, width=width, justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        return table

    def __enter__(self) -> "_Display":
        self._lines.restart()
        self._epoch_started = time.monotonic()
        if self._live is not None:
            self._live.__enter__()
            self._live.console.print(self._table([], header=True))
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            console.print(
                "[dim]str. patch strength (warm-up); loss, nat: robust and natural cross-entropy; acc, cert*: "
                "training batches (cert*: at the strategy's locations); val: IBP at every location[/]",
                highlight=False,
            )

    def event(self, event) -> None:
        if event.kind == "epoch":
            self._epoch_started = time.monotonic()
        else:
            if self._first_epoch is None:
                self._first_epoch = event.epoch - 1
            last = event.epoch == event.epochs and event.batch == event.num_batches
            if self._lines.due(finished=last):
                epoch_eta, run_eta = self._etas(event)
                self._lines.print(
                    f"train epoch {event.epoch}/{event.epochs}: {event.batch}/{event.num_batches} batches, "
                    f"{100.0 * event.batch / max(1, event.num_batches):.0f}%, strength {event.strength:.3f}, "
                    f"loss {event.loss:.4f}, {clock(self._lines.elapsed)} elapsed, epoch ETA {epoch_eta}, "
                    f"run ETA {run_eta}", finished=last)
        if not self.enabled:
            return
        if event.kind == "batch":
            now = time.monotonic()
            if now - self._last < 0.2 and event.batch != event.num_batches:
                return
            self._last = now
            epoch_eta, run_eta = self._etas(event)
            self._text.plain = (
                f"epoch {event.epoch}/{event.epochs} [{self.strategy}]  batch {event.batch}/{event.num_batches}  "
                f"strength {event.strength:.3f}  loss {event.loss:.4f}  epoch ETA {epoch_eta}  run ETA {run_eta}"
            )
            self._live.refresh()
            return
        m = event.metrics
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        row = [
            f"{m.epoch}/{self.epochs}", f(m.strength, ".2f"), f(m.lr, ".1e"), f(m.loss, ".3f"),
            f(m.natural_loss, ".3f"), f(m.unet_mse, ".3f"), f(m.train_accuracy, ".1%"), f(m.train_certified, ".1%"),
            f(m.val_clean_accuracy, ".1%"), f(m.val_certified_accuracy, ".1%"),
            f"{m.epoch_seconds + (m.eval_seconds or 0):.0f}s",
        ]
        self._live.console.print(self._table([row], header=False))
        self._text.plain = ""


@click.command("train", context_settings={"show_default": True})
@click.option("--data", default="sample", metavar="SOURCE",
              help="Training data: 'sample' (the bundled MNIST training digits, 0-3999 by default; never its "
              "test digits), an .npz file (x, y), or an MNIST IDX / CIFAR-10 batches directory, whose training "
              "split is used (DIR:test to train on its test split).")
@click.option("--start", type=int, default=None, show_default="0", help="First training image of --data.")
@click.option("--num", type=int, default=None, show_default="4000 for sample, else all",
              help="Number of training images (before the validation split is taken off).")
@click.option("--val-data", default=None, metavar="SOURCE",
              help="Separate validation data, e.g. DIR:test to validate on a directory's test split "
              "(default: see --val-size).")
@click.option("--val-start", type=int, default=None, show_default="0", help="First image of --val-data.")
@click.option("--val-num", type=int, default=None, show_default="all", help="Number of validation images.")
@click.option("--val-size", type=click.IntRange(min=0), default=None,
              show_default="sample: the held-out digits 4000-4999; else 10% of the training images, at most 5000",
              help="Hold out the last N training images for validation (0: no validation).")
@click.option("--arch", type=click.Choice(choices.ARCHITECTURES, case_sensitive=False), default="mlp",
              help="Architecture of the paper's App. A.1 (cnn4conv11/cnn4conv13: Table 7's CNNs for the "
              "sparse threat, cnn4 with an 11x11 / 13x13 first convolution).")
@click.option("--width", type=click.IntRange(min=1), default=None,
              show_default="mlp 255, cnn2/cnn4* 1, cnn5wide 16", help="Hidden units (mlp) or channel multiplier (CNNs).")
@click.option("--patch", default="2x2", metavar="HxW", help="Patch size.")
@click.option("--shape", default="square", metavar="SHAPE",
              help="Patch shape: square, rectangle, line, hline, vline, diamond, parallelogram, rectangle:HxW.")
@click.option("--strategy", type=click.Choice(choices.STRATEGIES, case_sensitive=False),
              default="random", help=_STRATEGY_HELP)
@click.option("--patches", "-k", type=click.IntRange(min=1), default=10, help=_PATCHES_HELP)
@click.option("--sparse", type=click.IntRange(min=1), default=None, metavar="K",
              help="Train against any K changed pixels (sparse attack; exact top-K first layer, IBP "
              "after it) instead of patches; --patch/--shape/--strategy/--patches do not apply. The "
              "schedules, outputs and checkpoints are the same.")
@click.option("--temperature", "-T", type=float, default=1.0, help="Guided sampling temperature T.")
@click.option("--pool", default="auto", metavar="auto|P[,P...]",
              help="Bound pooling windows after successive ReLU layers (pool strategy); the paper's 2,1,2 "
              "pools 2x2 blocks of locations after the first and third. auto: 2x2 blocks after the last ReLU "
              "before the first linear layer (after the convolutions; after the first ReLU of an MLP).")
@click.option("--unet-width", type=click.IntRange(min=1), default=16, help="Base width of the guided U-net.")
@click.option("--preset", type=click.Choice(choices.PRESETS), default="auto",
              show_default="mnist for 1 channel, cifar for 3",
              help="Defaults of App. A.1: mnist (lr 5e-4, 100 epochs, 1 natural + 61 warm-up), cifar (lr 1e-3, "
              "200 epochs, 10 natural + 121 warm-up, CIFAR-10 normalization, crop 4 + flip).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, show_default="preset", help="Epochs.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              show_default="preset; with --epochs below the preset's, scaled to the same fraction of the run",
              help="Epochs over which the patch interval grows linearly (per batch) from [x, x] to the full range.")
@click.option("--warmup-start", type=click.IntRange(min=0), default=None,
              show_default="preset; scaled like --warmup",
              help="Epochs of natural training before the warm-up.")
@click.option("--lr", type=float, default=None, show_default="preset", help="Adam learning rate.")
@click.option("--lr-step", type=click.IntRange(min=0), default=10,
              help="After the warm-up, multiply the learning rate by --lr-decay every this many epochs (0: never).")
@click.option("--lr-decay", type=float, default=0.5, help="Learning-rate factor per --lr-step.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per optimizer step.")
@click.option("--natural-weight", type=float, default=0.0,
              help="w in (1 - w) robust loss + w natural loss.")
@click.option("--mean", default=None, metavar="M[,M,M]", show_default="preset",
              help="Normalization mean, folded into the exported model (cifar preset: CIFAR-10's); give --std too.")
@click.option("--std", default=None, metavar="S[,S,S]", show_default="preset",
              help="Normalization std; give --mean too.")
@click.option("--init", type=click.Choice(choices.INITS), default="keep", show_default=True,
              help="Weights before training: 'keep' the architecture's own initialisation, or 'ibp' "
                   "(Shi et al. 2021: N(0, 2*pi/fan_in^2), biases 0; interval bounds neither grow nor "
                   "shrink with depth at the start, for a short --warmup).")
@click.option("--crop", type=click.IntRange(min=0), default=None, show_default="preset: mnist 0, cifar 4",
              help="Random crop after zero padding by N pixels (random shifts of up to N pixels); 0: off.")
@click.option("--flip/--no-flip", default=None, show_default="preset: cifar flips", help="Random horizontal flip.")
@click.option("--chunk", type=click.IntRange(min=1), default=None,
              show_default="about 64 MiB per bound tensor of the widest layer, 1024-16384 rows",
              help="(image, location) rows per bound computation and per micro-batch: the memory knob.")
@click.option("--eval-every", type=click.IntRange(min=0), default=1,
              help="Certify the validation subset every N epochs (0: only the final evaluation).")
@click.option("--eval-images", type=click.IntRange(min=0), default=200,
              help="Validation images certified (IBP, every location) after each epoch.")
@click.option("--final-eval/--no-final-eval", default=True,
              help="Certify the whole validation split at the end.")
@click.option("--seed", type=int, default=0, help="Seed: a CPU run with the same seed repeats exactly.")
@click.option("--device", type=click.Choice(choices.DEVICES, case_sensitive=False), default="cpu",
              help="Device (cuda: the process's own GPU under torchrun or --nproc).")
@click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N", show_default="1",
              help=NPROC_HELP + " --batch-size stays the images per optimizer step, over all processes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default="torch's default",
              help="CPU threads torch may use.")
@click.option("--out", "-o", "out", required=True, metavar="PATH",
              help="The ONNX model to write. Every output (--out, --checkpoint, --metrics) is written through "
              "symlinks and into devices and FIFOs, and must not be an input of the run (--data, --val-data, "
              "--resume; only --checkpoint may be the checkpoint being resumed).")
@click.option("--checkpoint", default=None, metavar="PATH", show_default="OUT with .ckpt.pt",
              help="Checkpoint written after every epoch (weights, optimizer, scheduler, RNG).")
@click.option("--resume", default=None, metavar="PATH",
              help="Continue from a checkpoint: its configuration, architecture and data selection are used; "
              "only --epochs, --chunk, --device, --nproc, --threads, --out, --checkpoint, --metrics and --quiet apply.")
@click.option("--metrics", default=None, metavar="PATH", show_default="OUT with .metrics.jsonl",
              help="Per-epoch metrics file: JSON lines, or CSV when it ends in .csv.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No live table (the summary is still printed).")
def train(**opts: Any) -> None:
    """Train a classifier certified against adversarial patches, and export it to ONNX.

    \b
    Examples:
      lirpa-patch train --data sample --arch mlp --patch 2x2 --strategy random --patches 10 --epochs 30 --out m.onnx
      lirpa-patch train --data cifar10/ --arch cnn5wide --patch 5x5 --strategy guided --patches 20 --out c.onnx
      lirpa-patch certify m.onnx --patch 2x2 --data sample
      lirpa-patch train --data sample --arch mlp --sparse 4 --out mnist_sparse4.onnx
      lirpa-patch train --data sample --arch mlp --epochs 30 --nproc 2 --out m.onnx
    """
    if opts["sparse"] is not None:
        ctx = click.get_current_context()
        for name in ("patch", "shape", "strategy", "patches"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--sparse cannot be combined with --{name} (a sparse attack has no patch)")
    out = Path(opts["out"])
    if out.suffix.lower() != ".onnx":
        raise click.BadParameter(f"must be an .onnx file, got {out}", param_hint="--out")
    checkpoint = Path(opts["checkpoint"]) if opts["checkpoint"] else out.with_suffix(".ckpt.pt")
    metrics_path = Path(opts["metrics"]) if opts["metrics"] else out.with_suffix(".metrics.jsonl")
    if opts["resume"] and not Path(opts["resume"]).expanduser().exists():  # before importing torch
        raise InputError(f"checkpoint {opts['resume']} does not exist")
    mean = parse_floats(opts["mean"], "--mean")
    std = parse_floats(opts["std"], "--std")
    launch_or_none(click.get_current_context(), opts["nproc"])  # --nproc N: this command line in N processes

    import torch

    import lirpa_patch  # noqa: F401  (auto_LiRPA shims first)
    from lirpa_patch import distributed
    from lirpa_patch.data import source_files
    from lirpa_patch.domain import check_normalization
    from lirpa_patch.devices import keep_freed_memory
    from lirpa_patch.outputs import check_outputs, check_writable
    from lirpa_patch.train import (
        EpochMetrics, MetricsLog, export_onnx, load_checkpoint, plan_from_checkpoint, plan_from_options,
        train_val_split,
    )
    from lirpa_patch.train.splits import SELECTION_KEYS

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    keep_freed_memory()  # large tensors reuse freed memory (no page faults per bound call)
    group = distributed.init(opts["device"])  # None in a single process; several: rank 0 alone writes
    primary = is_primary()
    check_normalization(mean, std)  # both or neither, before any data is read

    # 1. what the run reads and writes: the plan (a checkpoint to continue, or the options), the outputs
    if opts["resume"]:
        with param_as({"path": "resume", "state": "resume"}):
            plan = plan_from_checkpoint(load_checkpoint(opts["resume"]), epochs=opts["epochs"],
                                        chunk_size=opts["chunk"], device=opts["device"])
    else:
        plan = plan_from_options(
            {key: opts[key] for key in SELECTION_KEYS}, architecture=opts["arch"], width=opts["width"],
            preset=opts["preset"], mean=mean, std=std,
            patch=opts["patch"], shape=opts["shape"], strategy=opts["strategy"].lower(), patches=opts["patches"],
            temperature=opts["temperature"], pool=_parse_pool(opts["pool"]), unet_width=opts["unet_width"],
            epochs=opts["epochs"], warmup=opts["warmup"], warmup_start=opts["warmup_start"], lr=opts["lr"],
            lr_step=opts["lr_step"], lr_decay=opts["lr_decay"], batch_size=opts["batch_size"],
            natural_weight=opts["natural_weight"], crop=opts["crop"], flip=opts["flip"], chunk_size=opts["chunk"],
            init=opts["init"],
            eval_every=opts["eval_every"], eval_images=opts["eval_images"], seed=opts["seed"],
            device=opts["device"], sparse=opts["sparse"] or 0,
        )
    selection = plan.selection
    check_outputs(
        {"out": out, "checkpoint": checkpoint, "metrics": metrics_path},
        {"data": source_files(selection["data"]),
         "val_data": source_files(selection["val_data"]) if selection["val_data"] else None,
         "resume": opts["resume"]},
        allow=[("checkpoint", "resume")],  # resuming writes the checkpoint it continues
    )
    for path, what in ((out, "the ONNX model"), (checkpoint, "the checkpoint"), (metrics_path, "the metrics")):
        if not primary:
            break
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # a new run folder is made, as before
        except OSError as exc:
            raise click.FileError(str(path), hint=exc.strerror or str(exc)) from None
        check_writable(path, what=what)  # fail now, not after the first epoch

    # 2. training and validation images: the library's split policy; say which is which
    with library_warnings_silenced():
        splits = train_val_split(**selection)

    # 3. configuration and architecture (the checkpoint's, or the preset's with the options), the trainer
    setup = plan.resolve(splits)
    config, arch = setup.config, setup.architecture
    with library_warnings_silenced(), param_as({"state": "resume"}):
        trainer = setup.trainer()

    err_console.print(splits.description, highlight=False, markup=False, soft_wrap=True)
    err_console.print(
        f"[bold]train[/] {arch['name']} (width {setup.width}, {arch['num_classes']} classes) | "
        + (f"any {config.sparse} pixels | " if config.sparse else
           f"patch {config.patch} {config.shape} ({len(trainer.locations)} locations) | ")
        + f"{trainer.strategy.describe()} | {config.epochs} epochs, warm-up {config.warmup_start}+{config.warmup}"
        + _scaled(setup.warmup_scaled_from, config.epochs)
        + f", lr {config.lr:g}" + (f", {config.init} init" if config.init != "keep" else "")
        + (f" | resuming at epoch {trainer.epoch}" if plan.resuming else ""),
        highlight=False,
    )
    if group is not None:
        err_console.print(f"{group.world_size} processes ({group.backend}): each batch of {config.batch_size} "
                          "images is split between them", highlight=False)
    display = _Display(not opts["quiet"] and primary, config.epochs, trainer.strategy.describe(),
                       lines=not opts["quiet"] and primary and not err_console.is_terminal)

    # 4. train (checkpoint after every epoch, by rank 0), evaluate, export
    if primary:
        with param_as({"path": "metrics"}):
            log = MetricsLog(metrics_path)
    else:
        log = contextlib.nullcontext()
    with log:

        def callback(event) -> None:
            if event.kind == "epoch" and primary:
                log.append(event.metrics)
            display.event(event)

        start = time.perf_counter()
        with library_warnings_silenced(), display:
            trainer.fit(callback, checkpoint=checkpoint)
        train_seconds = time.perf_counter() - start

        final = None
        if opts["final_eval"] and splits.val is not None:
            t0 = time.perf_counter()
            with library_warnings_silenced():
                final = trainer.evaluate()
            if primary:
                log.append(EpochMetrics(
                    kind="final", epoch=trainer.epoch, val_images=final.num_images,
                    val_clean_accuracy=final.clean_accuracy, val_certified_accuracy=final.certified_accuracy,
                    eval_seconds=time.perf_counter() - t0,
                ))
    distributed.shutdown()
    if not primary:
        return
    with library_warnings_silenced(), param_as({"path": "out"}):
        check = (splits.val if splits.val is not None else splits.train).images[:64]
        diff = export_onnx(trainer.model, out, trainer.image_shape, check_images=check)

    console.print(f"[bold green]Wrote[/] {out} (onnxruntime matches PyTorch, max |logit diff| {diff:.2g})",
                  highlight=False)
    console.print(f"checkpoint {checkpoint}, metrics {metrics_path}, training {train_seconds:.0f}s", highlight=False)
    if final is not None:
        console.print(
            f"final: clean accuracy [bold]{final.clean_accuracy:.2%}[/], certified accuracy "
            f"[bold]{final.certified_accuracy:.2%}[/] on {final.num_images} validation images "
            + (f"(IBP, any {config.sparse} pixels)" if config.sparse else
               f"(IBP, all {len(trainer.locations)} locations of a {config.patch} {config.shape} patch)"),
            highlight=False,
        )


train.param_flags = {"chunk_size": "--chunk", "size": "--patch", "k": "--sparse", "dataset": "--preset"}
train.memory_hint = "lower --chunk (or --batch-size)"

COMMANDS = [train]
