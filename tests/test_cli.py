"""``lirpa-patch certify`` and ``lirpa-patch shapes`` end to end (click's CliRunner, in process).

A tiny MLP trained on 12 bundled MNIST digits and exported to ONNX stands in for
a user's model; the three real VNN-COMP models of ``../shared`` prove the
layouts and normalizations. Every bad input exits non-zero with one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from lirpa_patch_cli.main import app
from lirpa_patch.data import load_dataset
from lirpa_patch.locations import all_locations, num_locations
from lirpa_patch.shapes import SHAPE_NAMES, TRANSFER_SHAPES, make_shape

CIFAR_MEAN_STD = {
    "cifar_base_kw.onnx": ("0.485,0.456,0.406", "0.225,0.225,0.225"),
    "resnet_2b.onnx": ("0.4914,0.4822,0.4465", "0.2471,0.2435,0.2616"),
}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> str:
    """Exit code as expected, exactly one non-empty stderr line 'Error: ...', no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """An MLP (1x28x28 -> 10) fitted to 12 digits, as ONNX; six of those digits in an .npz.

    Image 2 of the .npz carries a wrong label, so the model misclassifies it.
    """
    root = tmp_path_factory.mktemp("tiny")
    train = load_dataset("sample", num=12)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(net(train.images), train.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    model = root / "tiny.onnx"
    torch.onnx.export(
        net, (torch.zeros(1, 1, 28, 28),), str(model), dynamo=False, opset_version=13,
        input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
    )
    with torch.no_grad():
        predictions = net(train.images[:6]).argmax(1)
    assert bool((predictions == train.labels[:6]).all())
    x = (train.images[:6, 0] * 255).round().to(torch.uint8).numpy()
    y = train.labels[:6].numpy().copy()
    y[2] = (y[2] + 1) % 10
    data = root / "digits.npz"
    np.savez(data, x=x, y=y)
    return SimpleNamespace(root=root, model=model, data=data)


@pytest.fixture(scope="module")
def tiny_run(tiny) -> SimpleNamespace:
    """One certify run of the tiny model on its six digits (1x1 patch, IBP), report written."""
    output = tiny.root / "report.json"
    result = invoke("certify", tiny.model, "--data", tiny.data, "--patch", "1x1", "--output", output)
    assert_ok(result)
    return SimpleNamespace(result=result, report=read_report(output))


@pytest.fixture
def cifar_npz(shared_dir, tmp_path) -> Path:
    """The first four images of ../shared/data/cifar10_86.npz, as their own .npz."""
    source = np.load(shared_dir / "data" / "cifar10_86.npz")
    path = tmp_path / "cifar4.npz"
    np.savez(path, x=source["x"][:4], y=source["y"][:4])
    return path


# --------------------------------------------------------------------------- real models


def test_shared_mnist_flat_model_certifies_with_crown(shared_dir, tmp_path):
    output = tmp_path / "r.json"
    result = invoke("certify", shared_dir / "models" / "mnist-net_256x2.onnx", "--data", "sample",
                    "--num", 3, "--method", "crown", "--output", output)
    assert_ok(result)
    s = read_report(output)["summary"]
    assert s["model_input"]["layout"] == "flat" and s["model_input"]["input_shape"] == [784, 1]
    assert s["method"] == "crown" and s["num_images"] == 3 and s["num_locations"] == 27 * 27
    assert s["clean_accuracy"] >= 2 / 3  # 99% on these held-out digits
    assert s["certified_accuracy"] <= s["clean_accuracy"]
    assert s["onnxruntime_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", ["cifar_base_kw.onnx", "resnet_2b.onnx"])
def test_shared_cifar_model_certifies_with_its_normalization(shared_dir, cifar_npz, tmp_path, name):
    mean, std = CIFAR_MEAN_STD[name]
    output = tmp_path / "r.json"
    result = invoke("certify", shared_dir / "models" / name, "--data", cifar_npz, "--patch", "2x2",
                    "--mean", mean, "--std", std, "--output", output)
    assert_ok(result)
    s = read_report(output)["summary"]
    assert s["model_input"]["layout"] == "nchw"
    assert s["model_input"]["mean"] == pytest.approx([float(v) for v in mean.split(",")])
    assert s["num_locations"] == 31 * 31 and s["image_shape"] == [3, 32, 32]
    # a wrong or missing normalization scores <= 50% on these images; the models are ~70% accurate
    assert s["clean_accuracy"] >= 0.75
    assert s["certified_accuracy"] <= s["clean_accuracy"]


@pytest.mark.parametrize("command", [["certify"], ["evaluate", "--steps", "2", "--restarts", "1", "--candidates", "2"]],
                         ids=["certify", "evaluate"])
def test_clean_accuracy_at_or_below_chance_warns_in_one_line_and_exits_0(shared_dir, cifar_npz, command):
    # cifar_base_kw expects its --mean/--std: without them it classifies none of these images
    result = invoke(command[0], shared_dir / "models" / "cifar_base_kw.onnx", *command[1:], "--data", cifar_npz,
                    "--patch", "2x2", "--quiet")
    assert_ok(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["warning: clean accuracy 0.0% is at or below chance (10.0% for 10 classes): "
                     "check --mean/--std and the input layout (--layout)"], result.stderr


def test_no_chance_warning_above_chance(tiny_run):
    assert "warning" not in tiny_run.result.stderr


# --------------------------------------------------------------------------- the report


def test_report_holds_every_documented_field(tiny_run):
    doc = tiny_run.report
    assert set(doc) == {"summary", "images"}
    for key in ("threat", "patch", "shape", "shape_variants", "pixel_count", "requested_pixel_count",
                "num_locations", "method", "num_images", "clean_accuracy", "certified_accuracy", "seconds",
                "images_per_second", "model", "data", "start", "num", "chunk", "device", "seed", "versions"):
        assert key in doc["summary"], key
    assert {"lirpa_patch", "auto_LiRPA", "torch", "onnxruntime"} <= set(doc["summary"]["versions"])
    for image in doc["images"]:
        assert set(image) == {"index", "label", "prediction", "correct", "certified", "worst_margin",
                              "worst_location", "worst_class", "exact_margin"}


def test_report_describes_the_patch(tiny_run):
    s = tiny_run.report["summary"]
    assert (s["threat"], s["patch"], s["shape"], s["shape_variants"]) == ("patch", "1x1", "square", ["1x1"])
    assert (s["pixel_count"], s["requested_pixel_count"], s["num_locations"]) == (1, 1, 784)


def test_misclassified_image_has_null_worst_margin(tiny_run):
    image = tiny_run.report["images"][2]  # its label was changed
    assert image["prediction"] != image["label"] and not image["correct"] and not image["certified"]
    assert image["worst_margin"] is None and image["worst_location"] is None and image["worst_class"] is None
    others = [im for k, im in enumerate(tiny_run.report["images"]) if k != 2]
    assert all(im["correct"] and im["worst_margin"] is not None for im in others)


def test_certified_iff_worst_margin_nonnegative(tiny_run):
    for image in tiny_run.report["images"]:
        assert image["certified"] == (image["worst_margin"] is not None and image["worst_margin"] >= 0)


def test_worst_location_is_on_the_image(tiny_run):
    for image in tiny_run.report["images"]:
        loc = image["worst_location"]
        if loc is not None:
            assert loc["shape"] == "square" and (loc["height"], loc["width"]) == (1, 1)
            assert 0 <= loc["top"] < 28 and 0 <= loc["left"] < 28
            assert image["worst_class"] != image["label"]


def test_summary_numbers_agree_with_images(tiny_run):
    s, images = tiny_run.report["summary"], tiny_run.report["images"]
    assert s["num_images"] == len(images) == 6
    assert s["clean_accuracy"] == pytest.approx(sum(i["correct"] for i in images) / 6) == pytest.approx(5 / 6)
    assert s["certified_accuracy"] == pytest.approx(sum(i["certified"] for i in images) / 6)
    assert s["images_per_second"] == pytest.approx(6 / s["seconds"])


def test_exit_zero_even_when_some_images_are_not_certified(tiny_run):
    assert tiny_run.result.exit_code == 0
    assert not all(image["certified"] for image in tiny_run.report["images"])


def test_summary_table_is_printed(tiny_run):
    out = tiny_run.result.stdout
    for text in ("Clean accuracy", "83.3% (5/6)", "Certified accuracy", "Images/s", "square 1x1 (1 px)", "784 per image"):
        assert text in out, text


def test_start_and_num_select_images_and_indices(tiny, tmp_path):
    output = tmp_path / "r.json"
    assert_ok(invoke("certify", tiny.model, "--data", tiny.data, "--start", 3, "--num", 2, "--patch", "1x1",
                     "--output", output))
    doc = read_report(output)
    assert [image["index"] for image in doc["images"]] == [3, 4]
    assert (doc["summary"]["start"], doc["summary"]["num"]) == (3, 2)


def test_shape_all_prints_transfer_table_and_reports_every_shape(tiny, tmp_path):
    output = tmp_path / "r.json"
    result = invoke("certify", tiny.model, "--data", tiny.data, "--num", 2, "--shape", "all", "--output", output)
    assert_ok(result)
    doc = read_report(output)
    assert doc["summary"]["shape"] == "all" and list(doc["shapes"]) == list(TRANSFER_SHAPES)
    for name, section in doc["shapes"].items():
        shape = make_shape(name, "2x2")
        assert section["summary"]["pixel_count"] == shape.pixel_count
        assert section["summary"]["num_locations"] == len(all_locations(shape, (28, 28)))
        assert len(section["images"]) == 2
    assert "Shape transfer" in result.stdout
    for name in TRANSFER_SHAPES:
        assert any(line.split()[:1] == [name] for line in result.stdout.splitlines()), name


def test_mask_file_shape(tiny, tmp_path):
    mask = tmp_path / "l.npy"
    np.save(mask, np.array([[1, 0], [1, 1]], dtype=bool))
    output = tmp_path / "r.json"
    assert_ok(invoke("certify", tiny.model, "--data", tiny.data, "--num", 1, "--shape", mask, "--output", output))
    s = read_report(output)["summary"]
    assert (s["shape"], s["shape_variants"], s["pixel_count"], s["num_locations"]) == ("custom", ["2x2"], 3, 729)
    assert s["mask_file"] == str(mask)


def test_crown_and_chunk_are_recorded(tiny, tmp_path):
    output = tmp_path / "r.json"
    assert_ok(invoke("certify", tiny.model, "--data", tiny.data, "--num", 1, "--method", "crown",
                     "--chunk", 100, "--output", output))
    s = read_report(output)["summary"]
    assert (s["method"], s["chunk"]) == ("crown", 100)


def test_no_check_skips_onnxruntime(tiny, tmp_path):
    output = tmp_path / "r.json"
    assert_ok(invoke("certify", tiny.model, "--data", tiny.data, "--num", 1, "--no-check", "--output", output))
    s = read_report(output)["summary"]
    assert s["onnxruntime_max_abs_diff"] is None and "onnxruntime" not in s["versions"]


def test_quiet_writes_nothing_to_stderr(tiny, tmp_path):
    result = invoke("certify", tiny.model, "--data", tiny.data, "--num", 1, "--quiet", "--output", tmp_path / "r.json")
    assert_ok(result)
    assert result.stderr == "" and "Certified accuracy" in result.stdout


# --------------------------------------------------------------------------- bad inputs


def test_missing_model_file(tiny, tmp_path):
    assert_one_line_error(invoke("certify", tmp_path / "nope.onnx", "--data", tiny.data), 1, "not found")


def test_malformed_onnx(tiny, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    assert_one_line_error(invoke("certify", bad, "--data", tiny.data), 1, "bad.onnx")


def test_missing_data_path(tiny, tmp_path):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tmp_path / "none.npz"), 1, "not found")


def test_patch_larger_than_image(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--patch", "30x30"), 2, "larger")


def test_bad_patch_syntax(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--patch", "2by2"), 2, "2by2")


def test_unknown_shape(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--shape", "hexagon"), 2, "hexagon")


def test_nan_in_data(tiny, tmp_path):
    x = np.full((2, 28, 28), 0.5, dtype=np.float32)
    x[1, 3, 4] = np.nan
    data = tmp_path / "nan.npz"
    np.savez(data, x=x, y=np.array([0, 1]))
    assert_one_line_error(invoke("certify", tiny.model, "--data", data), 1, "NaN")


def test_labels_out_of_range(tiny, tmp_path):
    data = tmp_path / "labels.npz"
    np.savez(data, x=np.zeros((4, 28, 28), dtype=np.uint8), y=np.arange(10, 14))
    assert_one_line_error(invoke("certify", tiny.model, "--data", data), 1, "out of range", "10 outputs")


def test_wrong_input_shape_for_the_model(tiny):
    result = invoke("certify", tiny.model, "--data", tiny.data, "--input-shape", "784x1")
    assert_one_line_error(result, 2, "--input-shape")


def test_wrong_layout_for_the_model(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--layout", "nhwc"), 2, "--layout")


def test_images_that_do_not_fit_the_model(tiny, cifar_npz):
    assert_one_line_error(invoke("certify", tiny.model, "--data", cifar_npz), 2, "(1, 28, 28)")


def test_wrong_mean_length(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--mean", "0.1,0.2"), 2, "--mean")


def test_unsupported_onnx_op(tiny, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Hardmax", ["f"], ["y"])],
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 784])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, str(path))
    assert_one_line_error(invoke("certify", path, "--data", tiny.data), 1, "Hardmax")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--device", "cuda"), 2, "CUDA")


def test_unwritable_output(tiny, tmp_path):
    output = tmp_path / "missing" / "r.json"
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--output", output), 1, "report")
    assert not output.parent.exists()


def test_output_is_a_directory(tiny, tmp_path):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--output", tmp_path), 1, "directory")


# --------------------------------------------------------------------------- shapes


def test_shapes_prints_every_shape_with_pixels_and_locations():
    result = invoke("shapes", "--patch", "5x5")
    assert_ok(result)
    out = result.stdout
    for name in SHAPE_NAMES:
        shape = make_shape(name, "5x5")
        variants = ", ".join(f"{v.shape[0]}x{v.shape[1]}" for v in shape.variants)
        flat = " ".join(out.split())  # headings may wrap
        assert f"{name} {variants} {shape.pixel_text()} px" in flat
        assert f"{num_locations(shape, (28, 28)):,} locations" in flat
    assert "#####" in out and "26-28 px (at least 25)" in out  # 5x5 square art; 2x13 .. 4x7 rectangles


def test_shapes_draws_the_diamond():
    result = invoke("shapes", "--patch", "2x2", "--shape", "diamond", "--image-size", "10x10")
    assert_ok(result)
    assert ".#\n  ##\n  .#" in result.stdout and "4 px " in result.stdout  # the paper's rows 1, 2, 1
    assert "72 locations" in result.stdout


def test_shapes_unknown_shape():
    assert_one_line_error(invoke("shapes", "--shape", "hexagon"), 2, "hexagon")


def test_shapes_bad_image_size():
    assert_one_line_error(invoke("shapes", "--image-size", "big"), 2, "--image-size")


# --------------------------------------------------------------------------- --sparse K


def test_sparse_report_describes_the_sparse_threat(tiny, tmp_path):
    output = tmp_path / "r.json"
    result = invoke("certify", tiny.model, "--data", tiny.data, "--sparse", 2, "--output", output)
    assert_ok(result)
    assert "sparse" in result.stdout
    doc = read_report(output)
    summary = doc["summary"]
    assert (summary["threat"], summary["sparse_k"], summary["pixel_count"]) == ("sparse", 2, 2)
    assert summary["patch"] is None and summary["shape"] is None and summary["num_locations"] is None
    assert summary["num_certified"] == sum(image["certified"] for image in doc["images"])
    for image in doc["images"]:
        assert image["worst_location"] is None
        if image["correct"]:
            assert image["certified"] == (image["worst_margin"] >= 0)
        else:
            assert image["worst_margin"] is None


def test_sparse_certifies_no_more_than_a_smaller_budget(tiny, tmp_path):
    certified = []
    for k in (1, 8):
        output = tmp_path / f"r{k}.json"
        assert_ok(invoke("certify", tiny.model, "--data", tiny.data, "--sparse", k, "--output", output))
        certified.append([image["worst_margin"] for image in read_report(output)["images"]])
    for small, large in zip(*certified):
        if small is not None:
            assert large <= small + 1e-6


def test_sparse_with_a_shape_is_a_usage_error(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--sparse", 2, "--shape", "line"),
                          2, "--sparse", "--shape")


def test_sparse_budget_larger_than_the_image(tiny):
    assert_one_line_error(invoke("certify", tiny.model, "--data", tiny.data, "--sparse", 785), 2, "785")


def test_alpha_crown_cascade_is_recorded_with_its_stages(tiny, tmp_path):
    output = tmp_path / "r.json"
    result = invoke("certify", tiny.model, "--data", tiny.data, "--num", 2, "--patch", "3x3", "--method",
                    "alpha-crown", "--exhaustive", "--intermediate", "crown", "--output", output)
    assert_ok(result)
    s = read_report(output)["summary"]
    c = s["cascade"]
    assert s["method"] == "alpha-crown"
    assert (c["methods"], c["exhaustive"], c["intermediate_choice"]) == (["ibp", "crown", "alpha-crown"], True, "given")
    assert set(c["stages"]) == {"ibp", "crown", "alpha-crown"}
    assert "Rows certified" in result.stdout


def test_default_method_is_ibp_alone(tiny_run):
    c = tiny_run.report["summary"]["cascade"]
    assert c["methods"] == ["ibp"] and c["exhaustive"] is False


def test_unknown_method_is_a_usage_error(tiny):
    result = invoke("certify", tiny.model, "--data", tiny.data, "--method", "beta-crown")
    assert_one_line_error(result, 2, "--method")
