"""``lirpa-patch attack``: attack a model's images with patches (or k pixels) and report what breaks.

Same model, data and threat options as ``certify`` (:mod:`lirpa_patch_cli._run`); the attack
is :mod:`lirpa_patch.attacks`. Flow: parse and check options -> load the data and the model
-> for every threat: (optionally) certify to find the worst certified locations, attack ->
JSON report (:func:`lirpa_patch.evaluation.attack_report`), adversarial images on request
-> the results table on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from . import _run
from ._console import console, err_console, library_warnings_silenced


@click.command("attack", context_settings={"show_default": True})
@_run.model_data_options()
@_run.attack_options(worst_default=0)
@click.option("--locations-from", "locations_from", default=None, metavar="REPORT",
              help="A certify JSON report of the same images: also attack in depth each image's worst "
              "certified location from it.")
@click.option("--save-adversarial", "save_adversarial", default=None, metavar="DIR",
              help="Write adversarial_<threat>.npz (x: every image's attacked version, y, index, success, "
              "adversarial_class) and a PNG per broken image (clean beside attacked) into DIR.")
def attack(model: str, patch: str, shape: str, sparse: Optional[str], locations_from: Optional[str],
           save_adversarial: Optional[str], **opts: Any) -> None:
    """Attack MODEL with adversarial patches at every location of every image (or any K pixels).

    The attack sweeps every location with cheap patch contents, then runs the paper's
    IFGSM and PGD with random restarts at the locations it finds weakest (and at the
    worst certified ones with --worst / --locations-from). Empirical accuracy (correct
    and not broken) is an upper bound of what any certificate can prove.

    \b
    Examples:
      lirpa-patch attack net.onnx --patch 2x2 --data sample --num 100
      lirpa-patch attack net.onnx --patch 2x2 --candidates all --restarts 5 --save-adversarial adv/
      lirpa-patch attack net.onnx --locations-from report.json -o attack.json
      lirpa-patch attack net.onnx --sparse 1,2,4,8
    """
    _run.check_model_exists(model)  # first, before anything imports torch
    _run.single_process("attack")  # no share of the images per process: not under torchrun
    threats = _run.parse_threats(patch, shape, sparse)
    _run.check_candidates(opts["candidates"])
    if threats.sparse:
        for name, flag in (("step_size", "--step-size"), ("worst", "--worst")):
            if click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"{flag} applies to patch attacks; it does not apply to --sparse")
        if locations_from is not None:
            raise click.UsageError("--locations-from applies to patch attacks; it does not apply to --sparse")
    if locations_from is not None and not Path(locations_from).expanduser().is_file():
        from ._console import InputError

        raise InputError(f"report file not found: {locations_from}")
    with library_warnings_silenced():
        _attack(model, threats, locations_from=locations_from, save_adversarial=save_adversarial, **opts)


attack.param_flags = {**_run.PARAM_FLAGS, "candidates": "--candidates", "restarts": "--restarts",
                      "steps": "--steps", "step_size": "--step-size", "location_index": "--locations-from"}


def _report_locations(path: str, item, image_size, indices: list[int]):
    """Per image, the location of ``item``'s shape named as worst in a certify report (-1: none), ``(N, 1)``."""
    import torch

    from lirpa_patch.errors import DataError
    from lirpa_patch.locations import all_locations

    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the certify report {path}: {exc}") from None
    sections = [doc]
    for key in ("shapes", "runs"):
        if isinstance(doc.get(key), dict):
            sections = [s for s in doc[key].values()]
            sections = [x for s in sections for x in (s["shapes"].values() if "shapes" in s else [s])]
    wanted = {}
    for section in sections:
        for image in section.get("images", []) if isinstance(section, dict) else []:
            loc = image.get("worst_location")
            if isinstance(loc, dict) and loc.get("shape") == item.shape.name:
                wanted[int(image["index"])] = (int(loc["variant"]), int(loc["top"]), int(loc["left"]))
    if not wanted:
        raise DataError(f"the report {path} names no worst location of a {item.shape.name} patch")
    locations = all_locations(item.shape, image_size)
    lookup = {(int(v), int(t), int(l)): i for i, (v, t, l) in
              enumerate(zip(locations.variant.tolist(), locations.top.tolist(), locations.left.tolist()))}
    return torch.tensor([[lookup.get(wanted.get(i, (-1, -1, -1)), -1)] for i in indices], dtype=torch.long)


def _attack(model: str, threats: "_run.Threats", *, locations_from: Optional[str], save_adversarial: Optional[str],
            data: str, start: int, num: Optional[int], method: str, input_shape: Optional[str], layout: Optional[str],
            mean: Optional[str], std: Optional[str], max_memory: Optional[str], chunk: Optional[int], device: str, seed: int,
            threads: Optional[int], output: Optional[str], no_check: bool, quiet: bool, steps, restarts, step_size, candidates, loss,
            worst: int) -> None:
    import torch

    from lirpa_patch.attacks import attack as attack_images
    from lirpa_patch.engine import bound_model, certify as certify_images
    from lirpa_patch.evaluation import attack_report

    from . import pictures, render

    method, device = method.lower(), _run.check_device(device.lower())
    memory = _run.parse_memory(max_memory)
    _run.check_paths({"output": output}, {"save_adversarial": save_adversarial}, model=model, data=data,
                     mask_file=threats.mask_file)
    _run.seed_everything(seed)
    run = _run.load(model=model, data=data, start=start, num=num, input_shape=input_shape, layout=layout, mean=mean,
                    std=std, device=device, check=not no_check, quiet=quiet, threads=threads)
    items = _run.threat_items(threats, run.image_shape)
    header = _run.header(run)
    memory = _run.memory(memory, device)  # on a GPU: a share of its free memory, the model on it
    images, labels = run.dataset.images, run.dataset.labels

    results = {}
    bounded = None
    with render.AttackProgress(err_console, enabled=run.interactive, lines=run.lines, header=header) as progress:
        for item in items:
            kwargs = _run.attack_kwargs(item, steps=steps, restarts=restarts, step_size=step_size,
                                        candidates=candidates, loss=loss, chunk=chunk)
            task = progress.task(item.label, what=f"attack {item.label}")
            extra = []
            if item.threat.location_set is None:  # rows that are no places: the threat's attack alone
                results[item.label] = attack_images(run.net, images, labels, item.threat, device=device,
                                                    indices=run.indices, seed=seed, progress=task, **kwargs)
                continue
            if worst > 0:
                if bounded is None:
                    bounded = bound_model(run.net, run.image_shape, device)
                cert = certify_images(run.net, images, labels, item.threat, method=method, chunk_size=chunk,
                                      max_memory=memory, device=device, indices=run.indices, bounded=bounded,
                                      keep_location_margins=True)
                margins = cert.location_margins.nan_to_num(nan=float("inf"))
                extra.append(margins.topk(min(worst, margins.shape[1]), dim=1, largest=False).indices)
            if locations_from is not None:
                extra.append(_report_locations(locations_from, item, run.image_shape[1:], run.indices))
            location_index = torch.cat(extra, dim=1) if extra else None
            results[item.label] = attack_images(run.net, images, labels, item.threat, location_index=location_index,
                                                device=device, indices=run.indices, seed=seed, progress=task, **kwargs)

    header()  # when nothing reported progress
    doc = attack_report(results, _run.run_info(run, model=model, data=data, start=start, num=num,
                                               item=items[0] if len(items) == 1 else None, method=method,
                                               chunk=next(iter(results.values())).chunk_size, device=device,
                                               seed=seed, mask_file=threats.mask_file))
    written = []
    if output is not None:
        from lirpa_patch import report

        written.append(report.write_report(output, doc))
    if save_adversarial is not None:
        count = sum(pictures.write_adversarial(save_adversarial, results[i.label], images, i.label) for i in items)
        written.append(f"{len(items)} .npz and {count} pictures in {save_adversarial}")
    console.print(render.attack_table(doc))
    if not quiet:
        for what in written:
            err_console.print(f"Wrote {what}", highlight=False, markup=False, soft_wrap=True)


COMMANDS = [attack]
