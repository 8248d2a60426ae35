"""Patch attacks for soundness tests: the real margins a concrete patch achieves.

A certified lower bound on ``z_true - z_other`` must be <= the margin of every
concrete image in the threat model. :func:`attack_patch` searches that set for
small margins at every location at once (locations are a batch dimension; no
Python loop over locations) and returns, per (image, location, other class),
the smallest margin it found. :func:`soundness_violations` compares that with
certified bounds.

Patch contents tried, all inside the pixel domain and changing only the pixels
of the location's mask:

* the clean image (the patch keeps the original pixels),
* uniform random contents,
* random corners of the box (each pixel at its low or high end), plus all-low
  and all-high,
* sign-gradient PGD from random starts, projected back to the box, minimising
  the worst margin, and (``targeted=True``) the margin of each other class in turn.

Margins use the convention of :func:`lirpa_patch.spec.other_classes`: the other
classes in increasing order.

Example::

    found = attack_patch(model, images, labels, locations.masks, restarts=2, pgd_steps=10)
    bound = lower_margins(bounded, images, labels, locations.masks, num_classes=K)
    assert_sound(found, bound, rounding_tolerance(model, images))
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lirpa_patch.domain import PixelDomain
from lirpa_patch.spec import other_classes


def margins(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Real margins ``z_true - z_other``, ``(N, K - 1)``, others in increasing class order."""
    logits = model(x)
    num_classes = logits.shape[1]
    others = other_classes(labels, num_classes)
    true = logits.gather(1, labels[:, None].long())
    return true - logits.gather(1, others)


def domain_box(domain: Optional[PixelDomain], channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lo, hi)`` as ``(1, C, 1, 1)`` in the model's input space."""
    lo, hi = (domain or PixelDomain()).bounds(channels, like)
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return lo.view(1, channels, 1, 1), hi.view(1, channels, 1, 1)


def _rows(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor):
    """(image, location) rows, image-major: images, labels and masks ``(R, 1, H, W)``."""
    n = images.shape[0]
    if masks.ndim == 3:
        masks = masks.unsqueeze(0).expand(n, *masks.shape)
    if masks.ndim != 4 or masks.shape[0] != n:
        raise ValueError(f"masks must be (L, H, W) or (N, L, H, W) with N = {n}, got {tuple(masks.shape)}")
    n_loc = masks.shape[1]
    x = images.repeat_interleave(n_loc, dim=0)
    y = labels.repeat_interleave(n_loc, dim=0)
    m = masks.reshape(n * n_loc, 1, *masks.shape[-2:]).to(torch.bool)
    return x, y, m, n_loc


def _attack_rows(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    restarts: int,
    pgd_steps: int,
    random_samples: int,
    corner_samples: int,
    targeted: bool,
    step_size: float,
    generator: torch.Generator,
) -> torch.Tensor:
    best: Optional[torch.Tensor] = None

    def patched(content: torch.Tensor) -> torch.Tensor:
        return torch.where(m, content, x)

    def record(content: torch.Tensor) -> None:
        nonlocal best
        with torch.no_grad():
            found = margins(model, patched(content), y)
        best = found if best is None else torch.minimum(best, found)

    def uniform() -> torch.Tensor:
        return lo + torch.rand(x.shape, generator=generator, dtype=x.dtype) * (hi - lo)

    def corner() -> torch.Tensor:
        return torch.where(torch.rand(x.shape, generator=generator, dtype=x.dtype) < 0.5, lo, hi)

    record(x)
    record(lo.expand_as(x))
    record(hi.expand_as(x))
    for _ in range(random_samples):
        record(uniform())
    for _ in range(corner_samples):
        record(corner())

    num_other = best.shape[1]
    objectives = [None] + (list(range(num_other)) if targeted else [])
    step = step_size * (hi - lo)
    for target in objectives:
        for r in range(restarts):
            content = uniform() if r else corner()
            for t in range(pgd_steps):
                content = content.detach().requires_grad_(True)
                found = margins(model, patched(content), y)
                loss = found.min(dim=1).values if target is None else found[:, target]
                (grad,) = torch.autograd.grad(loss.sum(), content)
                with torch.no_grad():
                    scale = 1.0 - t / max(1, pgd_steps)  # shrinking steps
                    content = content - scale * step * grad.sign()
                    content = torch.maximum(torch.minimum(content, hi), lo)
                record(content)
    return best


def attack_patch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    *,
    restarts: int = 2,
    pgd_steps: int = 10,
    random_samples: int = 4,
    corner_samples: int = 4,
    targeted: bool = True,
    step_size: float = 0.25,
    domain: Optional[PixelDomain] = None,
    seed: int = 0,
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """Smallest real margins found by patch attacks at every location.

    Args:
        model: maps ``(R, C, H, W)`` to logits ``(R, K)`` (eval mode).
        images: ``(N, C, H, W)`` in the model's input space.
        labels: ``(N,)``.
        masks: ``(L, H, W)`` shared or ``(N, L, H, W)`` per image; True = attacker's pixel.
        restarts: PGD starts per objective (the first from a random corner, the rest uniform).
        pgd_steps: sign-gradient steps per start (0 disables PGD).
        random_samples, corner_samples: uniform / random-corner contents tried.
        targeted: also run PGD on each other-class margin, not only the worst one.
        step_size: first PGD step as a fraction of the pixel range (then shrinks linearly).
        domain: pixel domain (range and normalization of the model's input);
            default ``[0, 1]`` in image space, as in :class:`~lirpa_patch.domain.PixelDomain`.
        seed: seeds every random choice.
        chunk_rows: (image, location) rows attacked together.

    Returns:
        ``(N, L, K - 1)``: per (image, location, other class) the minimum margin
        ``z_true - z_other`` over every patch content tried. Each entry is a real
        margin of some image in the threat model.
    """
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    images = images.detach()
    labels = labels.long()
    x, y, m, n_loc = _rows(images, labels, masks)
    lo, hi = domain_box(domain, images.shape[1], images)
    out = []
    for start in range(0, x.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        out.append(
            _attack_rows(
                model, x[sl], y[sl], m[sl], lo, hi,
                restarts=restarts, pgd_steps=pgd_steps, random_samples=random_samples,
                corner_samples=corner_samples, targeted=targeted, step_size=step_size,
                generator=generator,
            )
        )
    found = torch.cat(out)
    return found.reshape(images.shape[0], n_loc, -1)


def rounding_tolerance(model: nn.Module, images: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> torch.Tensor:
    """Per-image slack for float rounding, ``(N, 1, 1)``: ``atol + rtol * max |logit|``.

    A bound that is tight (the attack reaches it) differs from the real margin only
    by rounding, and float32 rounding grows with the size of the logits: margins of
    networks with logits around 30 carry errors of a few 1e-5 in either direction.
    ``rtol = 1e-5`` is about ten times the observed float32 error and orders of
    magnitude below any real violation; in float64 the absolute ``atol`` dominates.
    """
    with torch.no_grad():
        scale = model.eval()(images).abs().amax(dim=1)
    return (atol + rtol * scale).view(-1, 1, 1)


def soundness_violations(found: torch.Tensor, lower: torch.Tensor, tol: float | torch.Tensor = 1e-5) -> torch.Tensor:
    """Bool mask, shape of ``found``: where a real margin is below its certified lower bound by more than ``tol``.

    ``tol`` is a float or a tensor broadcastable to ``found`` (e.g. :func:`rounding_tolerance`).
    """
    if found.shape != lower.shape:
        raise ValueError(f"found margins {tuple(found.shape)} and bounds {tuple(lower.shape)} differ in shape")
    return found < lower.detach() - tol


def assert_sound(found: torch.Tensor, lower: torch.Tensor, tol: float | torch.Tensor = 1e-5, what: str = "bound") -> None:
    """Fail with the worst counterexample when a real margin is below its certified lower bound."""
    bad = soundness_violations(found, lower, tol)
    if bool(bad.any()):
        excess = (lower.detach() - found).masked_fill(~bad, float("-inf"))
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"UNSOUND {what}: {int(bad.sum())} of {bad.numel()} margins below the certified bound; "
            f"worst at (image, location, class) {idx}: real {float(found[idx]):.6g} < "
            f"bound {float(lower[idx]):.6g}"
        )


def assert_worst_margins_sound(result, found: torch.Tensor, tol: torch.Tensor) -> int:
    """Each bounded image's certified ``worst_margin`` is at most its smallest attacked margin (up to
    ``tol`` ``(N,)``), and no attack succeeds on a certified image; returns how many images were checked."""
    checked = 0
    for k, record in enumerate(result.images):
        if record.worst_margin is None:
            continue
        checked += 1
        assert record.worst_margin <= float(found[k].min()) + float(tol[k])
        if record.certified:  # then no attack may succeed anywhere
            assert float(found[k].min()) >= -float(tol[k])
    return checked
