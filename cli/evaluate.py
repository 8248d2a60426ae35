"""``lirpa-patch evaluate``: clean, empirical and certified accuracy side by side, cross-checked.

For every threat (patch size x shape, or sparse budget): certify every location
(:func:`lirpa_patch.evaluation.evaluate_patch` / ``evaluate_sparse``), attack every
location and, in depth, the worst certified ones; then check that no certified image
was broken. A violation is a soundness bug: the command says so loudly, names the
images, still writes its report, and exits with status 3.
"""

from __future__ import annotations

from typing import Any, Optional

import click

from . import _run
from ._console import console, err_console, library_warnings_silenced
from .table_file import check_table_path, table_option

SOUNDNESS_EXIT = 3
"""Exit status when an attack breaks a certified image (a soundness bug)."""


@click.command("evaluate", context_settings={"show_default": True})
@_run.model_data_options()
@_run.attack_options(worst_default=8)
@click.option("--html", "html", default=None, metavar="FILE",
              help="Write one self-contained HTML report (pictures embedded): accuracies with counts and 95% "
              "intervals, per class, margin histograms, where on the image patches decertify images, a "
              "sortable table of every image, the most broken images, adversarial examples beside their clean "
              "images, heatmaps, curves of a sweep.")
@table_option
@click.option("--plots", "plots", default=None, metavar="DIR",
              help="Write accuracy_<shape>.png (clean, empirical and certified accuracy against the swept "
              "patch size or k) into DIR.")
def evaluate(model: str, patch: str, shape: str, sparse: Optional[str], html: Optional[str], table: Optional[str],
             plots: Optional[str], **opts: Any) -> None:
    """Evaluate MODEL: clean, empirical (attacked) and certified accuracy per threat.

    The layout of the paper's Tables 2 and 5. Every threat is certified and attacked
    on the same images; an image that is certified but broken by the attack is a
    soundness bug: the command names it and exits with status 3.

    \b
    Examples:
      lirpa-patch evaluate net.onnx --patch 2x2 --data sample
      lirpa-patch evaluate net.onnx --patch 2x2 --shape all --html eval.html
      lirpa-patch evaluate net.onnx --patch 1x1,2x2,3x3,5x5 --plots plots/
      lirpa-patch evaluate net.onnx --sparse 1,2,4,8
    """
    _run.check_model_exists(model)  # first, before anything imports torch
    _run.single_process("evaluate")  # no share of the images per process: not under torchrun
    threats = _run.parse_threats(patch, shape, sparse)
    _run.check_candidates(opts["candidates"])
    check_table_path(table)
    if threats.sparse and click.get_current_context().get_parameter_source("step_size") \
            is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--step-size applies to patch attacks; it does not apply to --sparse")
    with library_warnings_silenced():
        code = _evaluate(model, threats, html=html, table=table, plots=plots, **opts)
    if code:
        click.get_current_context().exit(code)


evaluate.param_flags = {**_run.PARAM_FLAGS, "candidates": "--candidates", "restarts": "--restarts",
                        "steps": "--steps", "step_size": "--step-size"}


def _evaluate(model: str, threats: "_run.Threats", *, html: Optional[str], table: Optional[str],
              plots: Optional[str], data: str, start: int,
              num: Optional[int], method: str, input_shape: Optional[str], layout: Optional[str], mean: Optional[str],
              std: Optional[str], max_memory: Optional[str], chunk: Optional[int], device: str, seed: int,
              threads: Optional[int], output: Optional[str], no_check: bool, quiet: bool, steps, restarts, step_size, candidates, loss,
              worst: int) -> int:
    from lirpa_patch.engine import bound_model
    from lirpa_patch.evaluation import evaluate as evaluate_images, evaluation_report

    from . import pictures, render, report_page, table_file

    method, device = method.lower(), _run.check_device(device.lower())
    memory = _run.parse_memory(max_memory)
    _run.check_paths({"output": output, "html": html, "table": table}, {"plots": plots}, model=model, data=data,
                     mask_file=threats.mask_file)
    _run.seed_everything(seed)
    run = _run.load(model=model, data=data, start=start, num=num, input_shape=input_shape, layout=layout, mean=mean,
                    std=std, device=device, check=not no_check, quiet=quiet, threads=threads)
    items = _run.threat_items(threats, run.image_shape)
    header = _run.header(run)
    memory = _run.memory(memory, device)  # on a GPU: a share of its free memory, the model on it
    images, labels = run.dataset.images, run.dataset.labels
    with _run.status("Building the bounded model...", run.interactive):
        bounded = bound_model(run.net, run.image_shape, device)

    evaluations = []
    with render.CertifyProgress(err_console, enabled=run.interactive, lines=run.lines, header=header) as bars, \
            render.AttackProgress(err_console, enabled=run.interactive, lines=run.lines, header=header) as attack_bars:
        for item in items:
            kwargs = _run.attack_kwargs(item, steps=steps, restarts=restarts, step_size=step_size,
                                        candidates=candidates, loss=loss, chunk=None)
            common = dict(method=method, chunk_size=chunk, max_memory=memory, device=device, indices=run.indices,
                          bounded=bounded, seed=seed, attack_options=kwargs,
                          certify_progress=bars.task(f"{item.label}: certify", what=f"evaluate {item.label}: certify"),
                          attack_progress=attack_bars.task(item.label, what=f"evaluate {item.label}: attack"))
            evaluations.append(evaluate_images(run.net, images, labels, item.threat, worst_locations=worst, **common))

    header()  # when nothing reported progress
    doc = evaluation_report(evaluations, _run.run_info(
        run, model=model, data=data, start=start, num=num, item=items[0] if len(items) == 1 else None, method=method,
        chunk=evaluations[0].certified.chunk_size, device=device, seed=seed, mask_file=threats.mask_file))
    written = []
    if output is not None:
        from lirpa_patch import report

        written.append(report.write_report(output, doc))
    xlabel = "pixels changed (k)" if threats.sparse else "patch size"
    if plots is not None:
        from lirpa_patch import outputs

        root = outputs.output_folder(plots, what="the plots folder")
        for name in dict.fromkeys(r["shape"] or "sparse" for r in doc["summary"]["rows"]):
            png = _curve(doc, name, xlabel)
            outputs.write_output(root / f"accuracy_{pictures.slug(name)}.png", png, what="a plot")
        written.append(f"plots in {plots}")
    sections = [report_page.Section(e.name, e.certified, e.attacked) for e in evaluations]
    if table is not None:
        written.append(table_file.write_table(table, report_page.summary_rows(sections)))
    if html is not None:
        with _run.status("Writing the HTML report...", run.interactive):
            written.append(pictures.write_html(html, _page(doc, sections, run, xlabel)))
    console.print(render.evaluation_table(doc))
    render.warn_below_chance(err_console, evaluations[0].certified.clean_accuracy, run.loaded.num_classes)
    if not quiet:
        for what in written:
            err_console.print(f"Wrote {what}", highlight=False, markup=False, soft_wrap=True)
    violations = [(e.name, v) for e in evaluations for v in e.violations]
    if violations:
        err_console.print(
            f"[bold red]SOUNDNESS VIOLATION: {len(violations)} certified image(s) broken by the attack. A certificate "
            "is wrong: please report this as a bug, with the model and these images.[/]", highlight=False)
        for name, v in violations:
            err_console.print(f"[bold red]  {name}: {v.describe()}[/]", highlight=False, soft_wrap=True)
        return SOUNDNESS_EXIT
    return 0


def _curve(doc, shape_name: str, xlabel: str) -> bytes:
    from . import pictures

    rows = [r for r in doc["summary"]["rows"] if (r["shape"] or "sparse") == shape_name]
    return pictures.curve(rows, doc["summary"]["sweep"], {"clean": "clean_accuracy", "empirical": "empirical_accuracy",
                                                         "certified": "certified_accuracy"}, xlabel=xlabel)


def _page(doc, sections, run, xlabel: str):
    """The HTML page of an evaluate run (:mod:`lirpa_patch_cli.report_page`): soundness first, the
    headline, the curves of a sweep, then where the model is weak and the adversarial examples."""
    from lirpa_patch.plots import HtmlReport

    from . import report_page

    summary = doc["summary"]
    page = HtmlReport(f"lirpa-patch evaluate: {summary['model']}")
    if summary["num_violations"]:
        page.paragraph(f"SOUNDNESS VIOLATION: {summary['num_violations']} certified image(s) broken by the attack.",
                       css_class="alert")
        for v in doc["violations"]:
            page.paragraph(f"{v['evaluation']}: image {v['index']} certified with worst margin "
                           f"{v['certified_margin']:.6g}, attacked margin {v['attacked_margin']:.6g}", css_class="alert")
    report_page.add_headline(page, sections, summary)
    page.paragraph("Empirical: correct and not broken by the attack (an upper bound of robust accuracy). Certified: "
                   "proved for every patch content at every location (a lower bound).")
    if len(summary["sweep"]) > 1:
        page.heading("Accuracy against the threat")
        page.gallery([(_curve(doc, name, xlabel), f"accuracy against {xlabel} ({name})")
                      for name in dict.fromkeys(r["shape"] or "sparse" for r in summary["rows"])])
    report_page.add_analysis(page, sections, run.dataset.images, run.loaded.num_classes)
    return page


COMMANDS = [evaluate]
