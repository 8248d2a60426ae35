"""``lirpa-patch certify``: certify a model's images against every patch location.

Flow: parse and check options (cheap, before anything is loaded) -> load the data and
the model, cross-check it against onnxruntime (:mod:`lirpa_patch_cli._run`) -> certify
every threat (patch size x shape, or sparse budget) with the engine (progress on stderr)
-> write the JSON report (:mod:`lirpa_patch.report`), heatmaps and the HTML page ->
print the results table (:mod:`lirpa_patch_cli.render`) on stdout.
"""

from __future__ import annotations

from typing import Any, Optional

import click

from . import _choices as choices, _run
from ._console import console, err_console, library_warnings_silenced
from .launch import is_primary, launch_or_none
from .table_file import check_table_path, table_option


@click.command("certify", context_settings={"show_default": True})
@_run.model_data_options(nproc=True)
@click.option("--heatmaps", "heatmaps", default=None, metavar="DIR",
              help="Write, per image and patch shape, the image with its worst location outlined beside a "
              "heatmap of the worst certified margin at every location (PNG; DIR is created if missing).")
@click.option("--html", "html", default=None, metavar="FILE",
              help="Write one self-contained HTML report (pictures embedded): accuracies with counts and 95% "
              "intervals, per class, margin histograms, where on the image patches decertify images, a "
              "sortable table of every image, the most broken images, heatmaps, curves of a sweep.")
@table_option
@click.option("--groups", default="auto", metavar="auto|off|N",
              help="Location groups: bound blocks of NxN adjacent locations (N a power of two) by their union "
              "first and split only blocks that do not certify (with IBP alone, nor blocks above the image's "
              "lowest margin so far); 'auto' uses 2x2 blocks while they save rows (IBP), 'off' bounds every "
              "location. Decisions are the same either way, and so are the margins of images that are not certified; "
              "a certified image's margin may be a block's bound (exact_margin false in the report): 'off' "
              "makes every margin exact. Heatmaps and --html need every location's margin: groups are off "
              "with them.")
@click.option("--exhaustive", is_flag=True, default=False,
              help="With --method crown/alpha-crown: keep bounding an image's locations after one failed the "
              "strongest method (every location's margin). By default such an image is settled at once (not "
              "certified); heatmaps and --html always bound every location.")
@click.option("--intermediate", type=click.Choice(choices.INTERMEDIATE, case_sensitive=False), default="auto",
              help="How CROWN bounds the hidden layers: crown (full CROWN), ibp (CROWN-IBP: much faster on "
              "convolutional nets, looser), or auto (measured per model: ibp only where full CROWN would take "
              "over 2 min per image and CROWN-IBP stays close). The report says which was used.")
def certify(model: str, patch: str, shape: str, sparse: Optional[str], heatmaps: Optional[str], html: Optional[str],
            table: Optional[str], groups: str, exhaustive: bool, intermediate: str, **opts: Any) -> None:
    """Certify MODEL against adversarial patches at every location of every image.

    MODEL is an ONNX file, a TorchScript file or a pickled torch.nn.Module (.pt/.pth).
    An image is certified when, for every placement of the patch and every value of
    its pixels in [0, 1], the certified lower bound of logit[label] - logit[other]
    is >= 0 for every other class.

    \b
    Examples:
      lirpa-patch certify net.onnx --patch 2x2 --shape diamond --data mnist_test/ -o report.json
      lirpa-patch certify net.onnx --patch 1x1,2x2,3x3,5x5 --html sweep.html
      lirpa-patch certify net.onnx --sparse 1,2,4,8
      lirpa-patch certify resnet.onnx --data cifar/ --num 100 --mean 0.4914,0.4822,0.4465 \\
          --std 0.2471,0.2435,0.2616 --patch 5x5 --shape all --heatmaps maps/
      lirpa-patch certify net.onnx --data sample --nproc 2 -o report.json
      torchrun --nproc-per-node 2 -- "$(command -v lirpa-patch)" certify net.onnx --data sample -o report.json
    """
    _run.check_model_exists(model)  # first, before anything imports torch
    threats = _run.parse_threats(patch, shape, sparse)
    if heatmaps is not None and threats.sparse:
        raise click.UsageError("--heatmaps shows patch locations; it does not apply to --sparse")
    groups_value = _parse_groups(groups)
    check_table_path(table)
    _run.parse_memory(opts["max_memory"])
    launch_or_none(click.get_current_context(), opts.pop("nproc"))  # --nproc N: this command line in N processes
    with library_warnings_silenced():
        _certify(model, threats, heatmaps=heatmaps, html=html, table=table, groups=groups_value,
                 exhaustive=exhaustive or None, intermediate=intermediate.lower(), **opts)


def _parse_groups(value: str):
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("off", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not auto, off or a block size", param_hint="--groups") from None


certify.param_flags = {**_run.PARAM_FLAGS, "groups": "--groups"}
certify.memory_hint = "lower --max-memory (or --chunk)"


def _certify(model: str, threats: "_run.Threats", *, heatmaps: Optional[str], html: Optional[str],
             table: Optional[str], groups,
             exhaustive: Optional[bool], intermediate: str, data: str,
             start: int, num: Optional[int], method: str, input_shape: Optional[str], layout: Optional[str],
             mean: Optional[str], std: Optional[str], max_memory: Optional[str], chunk: Optional[int], device: str,
             seed: int, threads: Optional[int], output: Optional[str], no_check: bool, quiet: bool) -> None:
    from lirpa_patch import distributed, report
    from lirpa_patch.devices import resolve
    from lirpa_patch.engine import bound_model

    from . import pictures, render, report_page, table_file

    # 1. options that need nothing loaded; an output that is an input of the run is refused here
    method, device = method.lower(), _run.check_device(device.lower())
    where = resolve(device)  # under torchrun / --nproc, cuda is this process's own GPU
    job = distributed.init(where)  # None in a single process
    primary = is_primary()  # rank 0 alone prints and writes
    memory = _run.parse_memory(max_memory)
    _run.check_paths({"output": output, "html": html, "table": table}, {"heatmaps": heatmaps}, model=model, data=data,
                     mask_file=threats.mask_file)
    _run.seed_everything(seed)

    # 2. data and model; the threats, checked against the image size before allocating
    run = _run.load(model=model, data=data, start=start, num=num, input_shape=input_shape, layout=layout, mean=mean,
                    std=std, device=where, check=not no_check, quiet=quiet or not primary, threads=threads)
    items = _run.threat_items(threats, run.image_shape)
    header = _run.header(run)

    # 3. certify every threat (with several processes, each its share of the images; all results on rank 0)
    with _run.status("Building the bounded model...", run.interactive):
        bounded = bound_model(run.net, run.image_shape, where)
    memory = _run.memory(memory, where)  # on a GPU: a share of its free memory, the model on it
    pictures_wanted = heatmaps is not None or html is not None
    results = {}
    with render.CertifyProgress(err_console, enabled=run.interactive, lines=run.lines, header=header) as progress:
        for item in items:
            label = item.label if len(items) > 1 else "Certifying"
            common = dict(method=method, chunk_size=chunk, max_memory=memory, device=where, indices=run.indices,
                          bounded=bounded, progress=progress.task(label, what=f"certify {item.label}"),
                          exhaustive=exhaustive, intermediate=intermediate)
            per_location = pictures_wanted and item.threat.location_set is not None  # heatmaps draw locations
            results[item.label] = distributed.certify(run.net, run.dataset.images, run.dataset.labels, item.threat,
                                                      keep_location_margins=per_location, groups=groups, **common)
    header()  # when no image needed bounding
    distributed.shutdown()
    if not primary:
        return

    # 4. reports: one per swept value (a single report, or a shape-transfer report), then the sweep
    def info(item):
        return _run.run_info(run, model=model, data=data, start=start, num=num, item=item, method=method,
                             chunk=results[item.label].chunk_size, device=device, seed=seed,
                             mask_file=threats.mask_file, world_size=job.world_size if job else 1)

    docs = {}
    for value in dict.fromkeys(item.value for item in items):
        group = [item for item in items if item.value == value]
        if len(group) == 1:
            docs[value] = report.build_report(results[group[0].label], info(group[0]))
        else:
            docs[value] = report.build_transfer_report({i.shape.name: results[i.label] for i in group}, info(group[0]))
    if threats.sweep:
        doc = report.build_sweep_report(docs, info(items[0]), results[items[0].label])
        shown = render.sweep_table(doc)
    else:
        doc = next(iter(docs.values()))
        shown = render.transfer_table(doc) if "shapes" in doc else render.summary_table(doc["summary"])
    sections = [report_page.Section(item.label, results[item.label]) for item in items]

    written = []
    if output is not None:
        written.append(report.write_report(output, doc))
    if heatmaps is not None:
        with _run.status("Drawing heatmaps...", run.interactive):
            count = sum(pictures.write_heatmaps(heatmaps, results[i.label], run.dataset.images, i.label) for i in items)
        written.append(f"{count} heatmaps in {heatmaps}")
    if table is not None:
        written.append(table_file.write_table(table, report_page.summary_rows(sections)))
    if html is not None:
        with _run.status("Writing the HTML report...", run.interactive):
            written.append(pictures.write_html(html, _page(doc, items, sections, run, threats)))
    console.print(shown)
    render.warn_below_chance(err_console, results[items[0].label].clean_accuracy, run.loaded.num_classes)
    if not quiet:
        for what in written:
            err_console.print(f"Wrote {what}", highlight=False, markup=False, soft_wrap=True)


def _page(doc, items, sections, run, threats):
    """The HTML page of a certify run (:mod:`lirpa_patch_cli.report_page`): the headline, the curves
    of a sweep, then where the model is weak."""
    from lirpa_patch.plots import HtmlReport
    from lirpa_patch.report import sweep_rows

    from . import pictures, report_page

    summary = doc["summary"]
    page = HtmlReport(f"lirpa-patch certify: {summary['model']}")
    report_page.add_headline(page, sections, summary)
    if threats.sweep:
        rows = summary["rows"] if "rows" in summary else sweep_rows({items[0].value: doc})
        values = summary["sweep"]
        xlabel = "pixels changed (k)" if threats.sparse else "patch size"
        page.heading("Certified accuracy against the threat")
        page.gallery([(pictures.curve(rows, values, {"clean": "clean_accuracy", "certified": "certified_accuracy"},
                                      xlabel=xlabel, shape=name), f"certified accuracy against {xlabel}")
                      for name in dict.fromkeys(r["shape"] for r in rows)])
    report_page.add_analysis(page, sections, run.dataset.images, run.loaded.num_classes)
    return page


COMMANDS = [certify]
