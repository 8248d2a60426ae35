"""The certified-training loop (paper §4.2, App. A.1) around any image classifier.

Example::

    import lirpa_patch
    from lirpa_patch.train import Trainer, TrainConfig

    config = TrainConfig.for_dataset("mnist", patch="2x2", strategy="random", patches=10, epochs=30)
    trainer = Trainer(model, config, train_images, train_labels, val_images, val_labels)
    history = trainer.fit(callback=print, checkpoint="run.ckpt.pt")   # list of EpochMetrics
    result = trainer.evaluate()            # CertifyResult: IBP over every location

``model`` maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)`` (put a
normalization in front with :class:`~lirpa_patch.models.adapter.ImageModel`).

Per batch: the patch strength follows the warm-up (:mod:`.schedules`); the
strategy gives the worst certified lower margins ``(N, K - 1)``; the loss is
``(1 - w) * CE(-margins) + w * CE(logits)`` with ``w = natural_weight`` (at
strength 0 the loss is the natural cross-entropy alone), plus the strategy's
auxiliary loss (the U-net's MSE). Adam; the learning rate is constant during the
warm-up, then multiplied by ``lr_decay`` every ``lr_step`` epochs.

A batch is processed in micro-batches of at most ``chunk_size`` rows with
gradients (gradient accumulation: the loss is a mean over images, so the result is
the same), which bounds memory for every strategy.

Everything random (shuffling, augmentation, location sampling) draws from one
seeded CPU generator whose state is checkpointed, so a CPU run repeats exactly
and ``resume`` continues exactly where the checkpoint left off.

Under torch.distributed (a job joined with :func:`lirpa_patch.distributed.init`, e.g.
under ``torchrun``), every process builds the same trainer on the same data; every
batch is split between them (:func:`lirpa_patch.distributed.shard`: a distributed
sampler that keeps the one-process batches) and ``DistributedDataParallel`` averages
the gradients, each process's loss weighted by its share of the batch, so a step is the
one-process step up to float rounding. Shuffling and augmentation draw from the shared,
checkpointed generator (the same on every process); a strategy's random locations draw
from a per-process generator seeded from ``seed``, the epoch and the rank. The epoch's
metrics are summed over the processes, :meth:`evaluate` certifies its images split the
same way, and :meth:`fit` saves checkpoints on rank 0 only.

The library never prints: progress goes to the ``callback`` of :meth:`Trainer.fit`.

The run's definition lives in :mod:`.config` (:class:`TrainConfig`), what it reports in
:mod:`.metrics` (:class:`EpochMetrics`, :class:`TrainEvent`, :class:`MetricsLog`) and its
checkpoints in :mod:`.checkpoints`; their names are importable from here too.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import devices, distributed
from ..engine import SPARSE_CHUNK, CertifyResult, ProgressFn, bound_model
from ..domain import PixelDomain
from ..errors import DataError, UsageError
from ..locations import Locations
from ..outputs import PathLike
from ..shapes import PatchShape
from ..threats.base import Threat
from ..provenance import changes_since_built
from ..spec import certifies, check_labels, other_classes
from .checkpoints import CHECKPOINT_VERSION, load_checkpoint, restore, save_checkpoint, trainer_state
from .config import TrainConfig, config_from_dict
from .init import INITIALISERS
from .metrics import Callback, EpochMetrics, MetricsLog, TrainEvent
from .schedules import StepDecay, WarmupSchedule
from .strategies import BoundContext, Strategy, strategy_for

__all__ = [  # the loop here; the config, metrics and checkpoints from their modules, importable here as before
    "CHECKPOINT_VERSION",
    "CHUNK_BYTES",
    "CHUNK_ROWS",
    "Callback",
    "EpochMetrics",
    "MetricsLog",
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "automatic_chunk",
    "config_from_dict",
    "load_checkpoint",
    "margin_logits",
]

CHUNK_BYTES = 64 * 2**20
"""What one bound tensor of a chunk may hold when ``chunk_size`` is automatic: larger chunks
spend less time per row on calls, smaller ones stay in the caches (64 MiB)."""

CHUNK_ROWS = (1024, 16384)
"""The fewest and most rows of an automatic chunk."""


def automatic_chunk(model: nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> int:
    """Rows per bound computation for ``model``: about :data:`CHUNK_BYTES` per tensor of its widest layer.

    The widest layer is the largest output of the model's leaf modules (and its input) on one
    image of ``image_shape`` ``(C, H, W)``; the result lies within :data:`CHUNK_ROWS`.
    """
    widest = [math.prod(image_shape)]

    def record(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            widest.append(output[:1].numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    training = model.training
    try:
        model.eval()  # no running statistics move
        with torch.no_grad():
            model(torch.zeros((2, *image_shape), device=device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    per_row = max(widest) * torch.finfo(torch.float32).bits // 8
    return int(min(CHUNK_ROWS[1], max(CHUNK_ROWS[0], CHUNK_BYTES // per_row)))




def margin_logits(worst: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits for the robust loss: ``(N, K)`` with ``-worst`` at the other classes and 0 at the label.

    ``CE(margin_logits(worst, y), y)`` is eq. 12's cross-entropy on ``-(worst lower margins)``.
    """
    others = other_classes(labels, num_classes)
    z = torch.zeros(worst.shape[0], num_classes, dtype=worst.dtype, device=worst.device)
    return z.scatter(1, others, -worst)


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and optional horizontal flip of every image ``(N, C, H, W)``."""
    n, _, height, width = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < (0.5 if flip else 0.0)).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(height, device=x.device)[None, :]  # (N, H)
    cols = dx[:, None] + torch.arange(width, device=x.device)[None, :]  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[n_idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _check_data(images: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if images.ndim != 4:
        raise DataError(f"{what} images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{what} labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"the {what} set is empty")
    if not torch.isfinite(images).all():
        raise DataError(f"{what} images contain NaN or infinite values")


class Trainer:
    """Certified training of ``model`` against patches.

    Args:
        model: maps images ``(N, C, H, W)`` (pixel domain, default ``[0, 1]``) to
            logits ``(N, K)``; trained in place.
        config: the run's :class:`TrainConfig`.
        train_images, train_labels: ``(N, C, H, W)`` float and ``(N,)`` int64.
        val_images, val_labels: validation split (optional; needed for evaluation).
        num_classes: ``K`` (default: from the model's output).
        domain: pixel domain of the images (default ``[0, 1]``).
        strategy: a :class:`~lirpa_patch.train.strategies.Strategy` object to use
            instead of the one ``config.strategy`` names (e.g. another threat model).
        meta: JSON-friendly data stored in the checkpoint as is (the CLI keeps the
            architecture there).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        val_images: Optional[torch.Tensor] = None,
        val_labels: Optional[torch.Tensor] = None,
        *,
        num_classes: Optional[int] = None,
        domain: Optional[PixelDomain] = None,
        strategy: Optional[Strategy] = None,
        meta: Optional[dict] = None,
    ) -> None:
        config.validate()
        self.config = config
        self.meta = dict(meta or {})
        self.device = _device(config.device)
        _check_data(train_images, train_labels, "training")
        self.train_images = train_images.to(self.device, torch.float32)
        self.train_labels = train_labels.to(self.device, torch.long)
        self.val_images: Optional[torch.Tensor] = None
        self.val_labels: Optional[torch.Tensor] = None
        if val_images is not None and val_labels is not None:
            _check_data(val_images, val_labels, "validation")
            if tuple(val_images.shape[1:]) != tuple(train_images.shape[1:]):
                raise DataError(
                    f"validation images are {tuple(val_images.shape[1:])} but training images are "
                    f"{tuple(train_images.shape[1:])}"
                )
            self.val_images = val_images.to(self.device, torch.float32)
            self.val_labels = val_labels.to(self.device, torch.long)
        self.image_shape = tuple(int(v) for v in train_images.shape[1:])
        self.model = model.to(self.device)
        INITIALISERS[config.init](self.model, torch.Generator().manual_seed(config.seed))
        self.model.train()
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(self.model(self.train_images[:1]).shape[-1])
        self.num_classes = int(num_classes)
        check_labels(self.train_labels, self.num_classes, name="training labels")  # the rule of certify
        if self.val_labels is not None:
            check_labels(self.val_labels, self.num_classes, name="validation labels")
        if config.sparse:
            from ..threats.sparse import check_budget

            check_budget(config.sparse, self.image_shape, param="sparse")
        self.domain = domain
        self.threat: Threat = config.threat_model()
        """What this run trains against (:meth:`TrainConfig.threat_model`), prepared for the image size."""
        self.threat.prepare(self.image_shape[1:])
        self.shape: Optional[PatchShape] = self.threat.shape
        self.locations: Optional[Locations] = (
            self.threat.location_set.to(self.device) if self.threat.location_set is not None else None)
        self.bounded = bound_model(self.model, self.image_shape, self.device)
        self.chunk_size = config.chunk_size or automatic_chunk(self.model, self.image_shape, self.device)
        """Rows per bound computation: ``config.chunk_size``, or sized from the model's widest layer."""
        if strategy is None and config.sparse:  # the older field: its strategy, EveryRow of the sparse threat
            from .sparse_strategy import SparsePixels

            strategy = SparsePixels(config.sparse)
        self.strategy = strategy if strategy is not None else strategy_for(self.threat, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.strategy.setup(BoundContext(
                model=self.model, bounded=self.bounded, locations=self.locations, num_classes=self.num_classes,
                image_shape=self.image_shape, device=self.device, chunk_size=self.chunk_size, domain=domain,
            ))
        self.warmup = WarmupSchedule(config.warmup_start, config.warmup)
        decay = StepDecay(hold=self.warmup.end_epoch, step=config.lr_step, decay=config.lr_decay)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        aux = self.strategy.auxiliary
        self.aux_optimizer = torch.optim.Adam(aux.parameters(), lr=config.lr) if aux is not None else None
        self.aux_scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.aux_optimizer, decay) if self.aux_optimizer is not None else None
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.history: list[EpochMetrics] = []

    # ------------------------------------------------------------------ training
    def fit(self, callback: Optional[Callback] = None, *, checkpoint: Optional[PathLike] = None) -> list[EpochMetrics]:
        """Train from the current epoch to ``config.epochs``.

        After every epoch: evaluate the validation subset (when due), report an
        ``"epoch"`` event to ``callback`` and save ``checkpoint`` (when given).

        Returns:
            The metrics of every epoch so far (:attr:`history`).
        """
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch(callback)
            every = self.config.eval_every
            due = every > 0 and ((self.epoch % every == 0) or self.epoch == self.config.epochs)
            if due and self.val_images is not None and self.config.eval_images > 0:
                start = time.perf_counter()
                result = self.evaluate(num=self.config.eval_images)
                metrics.val_images = result.num_images
                metrics.val_clean_accuracy = result.clean_accuracy
                metrics.val_certified_accuracy = result.certified_accuracy
                metrics.eval_seconds = time.perf_counter() - start
            if checkpoint is not None and self._rank() == 0:  # one writer: rank 0 (under torch.distributed)
                self.save(checkpoint)
            if callback is not None:
                callback(TrainEvent("epoch", self.epoch, self.config.epochs, metrics=metrics))
        return self.history

    def train_epoch(self, callback: Optional[Callback] = None) -> EpochMetrics:
        """Run one epoch (epoch number :attr:`epoch` + 1) and append its metrics to :attr:`history`."""
        cfg = self.config
        start, cpu_start = time.perf_counter(), time.process_time()
        epoch = self.epoch
        group = distributed.current()
        if group is not None:  # this rank's draws (locations): its own generator, reseeded every epoch
            self._rank_generator = torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + epoch * 7919 + group.rank) % (1 << 62))
        lr = float(self.optimizer.param_groups[0]["lr"])
        n = self.train_images.shape[0]
        order = torch.randperm(n, generator=self.generator).to(self.device)
        num_batches = math.ceil(n / cfg.batch_size)
        sums = dict(loss=0.0, robust=0.0, natural=0.0, correct=0.0, certified=0.0, unet=0.0)
        robust_images = unet_images = rows = 0
        strength = 0.0
        self.model.train()
        for b in range(num_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            images, labels = self.train_images[idx], self.train_labels[idx]
            if cfg.crop > 0 or cfg.flip:
                images = _augment(images, self.generator, cfg.crop, cfg.flip)
            strength = self.warmup.strength(epoch, b, num_batches)
            part = distributed.shard(images.shape[0], group.rank, group.world_size) if group is not None else None
            step = self._step(images, labels, strength, part=part)
            m = images.shape[0]
            for key in ("loss", "natural", "correct"):
                sums[key] += step[key] * m
            if step["robust"] is not None:
                sums["robust"] += step["robust"] * m
                sums["certified"] += step["certified"] * m
                robust_images += m
            if step["unet"] is not None:
                sums["unet"] += step["unet"] * m
                unet_images += m
            rows += step["rows"]
            if callback is not None:
                callback(TrainEvent("batch", epoch + 1, cfg.epochs, b + 1, num_batches, strength, step["loss"]))
        self.scheduler.step()
        if self.aux_scheduler is not None:
            self.aux_scheduler.step()
        self.epoch += 1
        metrics = EpochMetrics(
            epoch=self.epoch,
            lr=lr,
            strength=strength,
            loss=sums["loss"] / n,
            robust_loss=sums["robust"] / robust_images if robust_images else None,
            natural_loss=sums["natural"] / n,
            unet_mse=sums["unet"] / unet_images if unet_images else None,
            train_accuracy=sums["correct"] / n,
            train_certified=sums["certified"] / robust_images if robust_images else None,
            rows=rows,
            epoch_seconds=time.perf_counter() - start,
            epoch_cpu_seconds=time.process_time() - cpu_start,
        )
        self.history.append(metrics)
        return metrics

    def _micro_batch(self) -> int:
        return max(1, self.chunk_size // max(1, self.strategy.grad_rows_per_image()))

    def _step(self, images: torch.Tensor, labels: torch.Tensor, strength: float,
              part: Optional[slice] = None) -> dict:
        """One optimizer step on a batch, in micro-batches; returns batch averages.

        Under torch.distributed every rank gets the whole batch and works on its ``part``;
        the gradients are averaged by ``DistributedDataParallel`` with each rank's loss
        weighted by its share of the batch, so the step is the one-process step.
        """
        cfg = self.config
        w = cfg.natural_weight
        robust = strength > 0 and w < 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.aux_optimizer is not None:
            self.aux_optimizer.zero_grad(set_to_none=True)
        n = images.shape[0]
        ddp = self._ddp() if part is not None else None
        world = distributed.current().world_size if ddp is not None else 1
        weight = 1.0
        if part is not None:
            local, local_labels = images[part], labels[part]
            if local.shape[0] == 0:  # no share of this batch: a weightless image keeps the ranks in step
                local, local_labels, weight = images[:1], labels[:1], 0.0
            images, labels = local, local_labels
        generator = self.generator if ddp is None else self._rank_generator
        micro = self._micro_batch() if robust else images.shape[0]
        starts = list(range(0, images.shape[0], micro))
        out = dict(loss=0.0, robust=None, natural=0.0, correct=0.0, certified=None, unet=None, rows=0)
        for i, s in enumerate(starts):
            x, y = images[s : s + micro], labels[s : s + micro]
            frac = x.shape[0] / n * weight
            last = i == len(starts) - 1
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                parts = (ddp if ddp is not None else self._loss)(x, y, strength, generator)
                (parts["total"] * (frac * world)).backward()
            out["natural"] += parts["natural"] * frac
            out["correct"] += parts["correct"] * frac
            if parts["robust"] is not None:
                out["robust"] = (out["robust"] or 0.0) + parts["robust"] * frac
                out["certified"] = (out["certified"] or 0.0) + parts["certified"] * frac
                if parts["unet"] is not None:
                    out["unet"] = (out["unet"] or 0.0) + parts["unet"] * frac
                out["rows"] += parts["rows"] if weight else 0
            out["loss"] += parts["loss"] * frac
        if ddp is not None:
            out = _sum_over_ranks(out)
        self.optimizer.step()
        if self.aux_optimizer is not None:
            self.aux_optimizer.step()  # a no-op without gradients (strength 0)
        return out

    def _loss(self, x: torch.Tensor, y: torch.Tensor, strength: float, generator: torch.Generator) -> dict:
        """The loss of one micro-batch: ``total`` (to back-propagate) and its parts as floats."""
        w = self.config.natural_weight
        robust = strength > 0 and w < 1
        logits = self.model(x)
        natural = F.cross_entropy(logits, y)
        out = dict(natural=float(natural.detach()), correct=float((logits.detach().argmax(1) == y).float().mean()),
                   robust=None, certified=None, unet=None, rows=0)
        loss = natural
        total = natural
        if robust:
            margins = self.strategy.worst_margins(x, y, strength=strength, generator=generator)
            rob = F.cross_entropy(margin_logits(margins.worst, y, self.num_classes), y)
            loss = (1 - w) * rob + w * natural if w > 0 else rob
            total = loss if margins.aux_loss is None else loss + margins.aux_loss
            out["robust"] = float(rob.detach())
            out["certified"] = float(certifies(margins.worst.detach()).all(dim=1).float().mean())
            if "unet_mse" in margins.stats:
                out["unet"] = margins.stats["unet_mse"]
            out["rows"] = margins.rows
        out["loss"] = float(loss.detach())
        out["total"] = total
        return out

    # ------------------------------------------------------------------ torch.distributed
    def _rank(self) -> int:
        group = distributed.current()
        return group.rank if group is not None else 0

    def _ddp(self) -> Optional[nn.Module]:
        """The ``DistributedDataParallel`` wrapper of :meth:`_loss` (model and U-net), built on first use."""
        group = distributed.current()
        if group is None:
            return None
        if self.__dict__.get("_ddp_module") is None:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp_module = DistributedDataParallel(
                _LossModule(self), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # ranks run different numbers of micro-batches per step
                find_unused_parameters=self.strategy.auxiliary is not None,  # the U-net rests at strength 0
            )
            # the wrapper holds the process group: distributed.shutdown() must be able to free the group
            # (and join gloo's threads) while this trainer lives on (rank 0 exports its model afterwards)
            group.on_shutdown(weakref.WeakMethod(self._release_ddp))
        return self._ddp_module

    def _bounded_as_is(self):
        """The training module for certification, or None (certify then builds one) when the model
        changed in a way the module does not share: it shares the parameters, not buffers (e.g.
        BatchNorm statistics), code or hooks (:mod:`lirpa_patch.provenance`)."""
        return self.bounded if changes_since_built(self.model, self.bounded) is None else None

    def _release_ddp(self) -> None:
        """Drop the ``DistributedDataParallel`` wrapper (at :func:`lirpa_patch.distributed.shutdown`)."""
        self.__dict__.pop("_ddp_module", None)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        num: Optional[int] = None,
        progress: Optional[ProgressFn] = None,
    ) -> CertifyResult:
        """Certify (IBP, every row of :attr:`threat`: every patch location, full patch range) the first ``num`` images.

        Against any other threat (:attr:`threat`): IBP on every row, full strength (the sparse
        threat: the exact top-k first layer, full valid range). Defaults to the validation set given to the
        constructor. Under torch.distributed every process must call it (each certifies
        its share of the images; every process gets the whole result).
        """
        if images is None or labels is None:
            if self.val_images is None or self.val_labels is None:
                raise UsageError("no validation set: pass images and labels to evaluate()", param="images")
            images, labels = self.val_images, self.val_labels
        if num is not None:
            images, labels = images[:num], labels[:num]
        was_training = self.model.training
        try:
            per_call = self.chunk_size if self.threat.rows_per_image > 1 else min(self.chunk_size, SPARSE_CHUNK)
            return distributed.certify(
                self.model, images, labels, self.threat, method="ibp", chunk_size=per_call, device=self.device,
                domain=self.domain, bounded=self._bounded_as_is(), progress=progress,
            )
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizers, schedulers, RNG, history
        (:func:`~lirpa_patch.train.checkpoints.trainer_state`)."""
        return trainer_state(self)

    def save(self, path: PathLike) -> Path:
        """Write :meth:`state_dict` to ``path`` as :mod:`lirpa_patch.outputs` writes every output.

        A regular file is replaced atomically (a temporary file, then a rename: an
        interrupted save keeps the previous checkpoint); a symlink is written through;
        ``/dev/null`` or a FIFO is written into.
        """
        return save_checkpoint(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (from a trainer built with the same model and config;
        :func:`~lirpa_patch.train.checkpoints.restore`)."""
        restore(self, state)

    def resume(self, path: PathLike) -> None:
        """Continue from a checkpoint written by :meth:`save` (see :func:`load_checkpoint`)."""
        self.load_state_dict(load_checkpoint(path))


def _device(name: str) -> torch.device:
    """This process's device (under torchrun, ``cuda`` is the process's own GPU)."""
    return devices.resolve(name)


class _LossModule(nn.Module):
    """A trainer's micro-batch loss as a module that owns the trained parameters (model and U-net),
    so that ``DistributedDataParallel`` can average their gradients."""

    def __init__(self, trainer: "Trainer") -> None:
        super().__init__()
        self.model = trainer.model
        self.aux = trainer.strategy.auxiliary
        # weakly: the trainer holds the DistributedDataParallel wrapper of this module (which holds the
        # process group); without a cycle, the wrapper is freed as soon as the trainer drops it
        # (Trainer._release_ddp, at distributed.shutdown)
        self._loss = weakref.WeakMethod(trainer._loss)

    def forward(self, x: torch.Tensor, y: torch.Tensor, strength: float, generator: torch.Generator) -> dict:
        loss = self._loss()
        if loss is None:  # pragma: no cover - the trainer owns this module
            raise RuntimeError("the trainer of this loss module is gone")
        return loss(x, y, strength, generator)


def _sum_over_ranks(step: dict) -> dict:
    """A step's averages over the whole batch: every rank's shares added up (None stays None)."""
    import torch.distributed as dist

    keys = ("loss", "natural", "correct", "robust", "certified", "unet", "rows")
    values = torch.tensor([float(step[k] or 0.0) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, group=distributed.current().objects)
    out = {k: (None if step[k] is None else float(v)) for k, v in zip(keys, values.tolist())}
    out["rows"] = int(round(out["rows"]))
    return out
