"""Attacks on the sparse (k-pixel) threat model, for soundness tests.

Images are ``(N, C, H, W)``; an attack changes at most ``k`` pixels (all channels of
a pixel together) to values in ``[lo, hi]`` (per channel). Every function returns
points, or the smallest value it found of each objective.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]
"""Maps points ``(N, C, H, W)`` to objectives ``(N, S)`` (e.g. margins) to minimise."""


def _ranges(x: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    lo = torch.as_tensor(lo, dtype=x.dtype).reshape(-1).expand(c).view(1, c, 1, 1)
    hi = torch.as_tensor(hi, dtype=x.dtype).reshape(-1).expand(c).view(1, c, 1, 1)
    return lo, hi


def all_sparse_corners(x: torch.Tensor, k: int, lo=0.0, hi=1.0) -> torch.Tensor:
    """Every image with at most ``k`` pixels moved to a corner of their range: ``(N, M, C, H, W)``.

    For a function that is linear in the input this set attains its exact maximum and
    minimum over the sparse set (each chosen pixel's channels are independent, and a
    linear function of one channel is extreme at an end).
    """
    n, c, h, w = x.shape
    lo, hi = _ranges(x, lo, hi)
    ends = torch.stack([lo.view(c), hi.view(c)])  # (2, C)
    pts = [x]
    for kk in range(1, k + 1):
        for pixels in itertools.combinations(range(h * w), kk):
            for corner in itertools.product(range(2), repeat=c * kk):
                z = x.clone()
                for t, p in enumerate(pixels):
                    for ch in range(c):
                        z[:, ch, p // w, p % w] = ends[corner[t * c + ch], ch]
                pts.append(z)
    return torch.stack(pts, dim=1)


def evaluate_points(f: Callable[[torch.Tensor], torch.Tensor], pts: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """``f`` on points ``(N, M, C, H, W)`` -> ``(N, M, ...)``."""
    n, m = pts.shape[:2]
    flat = pts.reshape(n * m, *pts.shape[2:])
    with torch.no_grad():
        out = torch.cat([f(flat[i : i + batch]) for i in range(0, flat.shape[0], batch)])
    return out.reshape(n, m, *out.shape[1:])


def random_sparse(x: torch.Tensor, k: int, num: int, lo=0.0, hi=1.0, *, corners: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``num`` random points per image: ``k`` random pixels set to random corners or values."""
    n, c, h, w = x.shape
    lo, hi = _ranges(x, lo, hi)
    pts = x.unsqueeze(1).repeat(1, num, 1, 1, 1).reshape(n * num, c, h * w)
    scores = torch.rand(n * num, h * w, generator=generator)
    chosen = scores.topk(min(k, h * w), dim=1).indices  # (R, k)
    if corners:
        u = (torch.rand(n * num, c, chosen.shape[1], generator=generator) < 0.5).to(x.dtype)
    else:
        u = torch.rand(n * num, c, chosen.shape[1], generator=generator)
    vals = lo.view(1, c, 1) + u * (hi - lo).view(1, c, 1)
    pts.scatter_(2, chosen.unsqueeze(1).expand(-1, c, -1), vals)
    return pts.reshape(n, num, c, h, w)


def _best_pixel_moves(x, grad, lo, hi):
    """Per pixel: the linearised decrease of the objective from its best corner, and that corner."""
    down_lo = grad * (lo - x)  # objective change moving a channel to lo
    down_hi = grad * (hi - x)
    take_lo = down_lo < down_hi
    best = torch.where(take_lo, down_lo, down_hi).clamp(max=0)
    corner = torch.where(take_lo, lo.expand_as(x), hi.expand_as(x))
    corner = torch.where(best < 0, corner, x)
    return best.sum(dim=1), corner  # (N, H, W), (N, C, H, W)


def pgd_sparse(f: Objective, x: torch.Tensor, k: int, lo=0.0, hi=1.0, *, steps: int = 10, restarts: int = 4,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gradient-guided search minimising every objective column separately; smallest values ``(N, S)``."""
    n, c, h, w = x.shape
    lo, hi = _ranges(x, lo, hi)
    with torch.no_grad():
        best = f(x).clone()
    columns = best.shape[1]
    for s in range(columns):
        for r in range(restarts):
            z = x.clone() if r == 0 else random_sparse(x, k, 1, lo.view(-1), hi.view(-1), generator=generator)[:, 0]
            for _ in range(steps):
                z = z.detach().requires_grad_(True)
                obj = f(z)[:, s]
                grad, = torch.autograd.grad(obj.sum(), z)
                gain, corner = _best_pixel_moves(x, grad, lo, hi)
                top = gain.reshape(n, -1).topk(min(k, h * w), dim=1, largest=False).indices
                mask = torch.zeros(n, h * w, dtype=torch.bool)
                mask.scatter_(1, top, True)
                mask = mask.view(n, 1, h, w)
                z = torch.where(mask, corner, x).detach()
                with torch.no_grad():
                    best[:, s] = torch.minimum(best[:, s], f(z)[:, s])
    return best


def greedy_sparse(f: Objective, x: torch.Tensor, k: int, lo=0.0, hi=1.0) -> torch.Tensor:
    """Greedy: add one pixel at a time, trying every corner of every unused pixel; smallest values ``(N, S)``.

    Exhaustive per step, so only for tiny images.
    """
    n, c, h, w = x.shape
    lo, hi = _ranges(x, lo, hi)
    ends = torch.stack([lo.view(c), hi.view(c)])
    corners = [torch.tensor([ends[b[ch], ch] for ch in range(c)]) for b in itertools.product(range(2), repeat=c)]
    with torch.no_grad():
        best = f(x).clone()
        for s in range(best.shape[1]):
            z = x.clone()
            for _ in range(k):
                cands = []
                for p in range(h * w):
                    for corner in corners:
                        y = z.clone()
                        y[:, :, p // w, p % w] = corner
                        cands.append(y)
                stacked = torch.stack(cands, dim=1)
                # one call, image-major: objectives that depend on the image (margins) stay aligned
                vals = evaluate_points(lambda t: f(t)[:, s : s + 1], stacked, batch=stacked.shape[0] * stacked.shape[1])[..., 0]
                pick = vals.argmin(dim=1)
                z = stacked[torch.arange(n), pick]
                best[:, s] = torch.minimum(best[:, s], vals.min(dim=1).values)
    return best
