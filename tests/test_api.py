"""The public API and the library/CLI boundary (issue 8, items 9-13 and the API rough edges).

The library returns values and raises errors that name Python parameters; it never names
a command-line flag. The CLI (``lirpa_patch_cli``) is the only place that knows flags.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import lirpa_patch
from lirpa_patch import PatchPerturbation, PixelDomain, SparsePerturbation, UsageError
from lirpa_patch.engine import certify
from lirpa_patch.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lirpa_patch"


# --------------------------------------------------------------------------- public names


def test_every_public_name_is_what_the_readme_calls_not_a_submodule():
    for name in lirpa_patch.__all__:
        exec(f"from lirpa_patch import {name}", {})
    for name in lirpa_patch.__all__:
        assert not isinstance(getattr(lirpa_patch, name), types.ModuleType), name
    namespace: dict = {}
    exec("from lirpa_patch import load_dataset, certify", namespace)
    assert callable(namespace["certify"]) and namespace["certify"] is certify


# --------------------------------------------------------------------------- no CLI flags in the library


def _messages(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not documentation (messages, f-string parts)."""
    tree = ast.parse(path.read_text())
    docstrings = {  # docstrings, and the strings documenting module attributes
        id(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


def test_no_library_message_names_a_command_line_flag():
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _messages(path):
            for match in flag.findall(text):
                if match != "--no-deps":  # the install hint `pip install --no-deps auto-LiRPA`
                    found.append(f"{path.relative_to(ROOT)}:{line}: {match}")
    assert not found, "\n".join(found)


def test_the_library_never_imports_the_cli_nor_decides_exit_codes():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "lirpa_patch_cli" not in text and "sys.exit" not in text and "exit_code" not in text, path


def _raises(call) -> UsageError:
    with pytest.raises(UsageError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message
    return error.value


@pytest.mark.parametrize("call, param", [
    (lambda: lirpa_patch.load_dataset("sample", start=-1), "start"),
    (lambda: lirpa_patch.load_dataset("sample", num=0), "num"),
    (lambda: lirpa_patch.make_shape("hexagon"), "shape"),
    (lambda: lirpa_patch.make_shape("square", "2by2"), "size"),
    (lambda: lirpa_patch.TrainConfig(epochs=0).validate(), "epochs"),
    (lambda: lirpa_patch.TrainConfig(chunk_size=0).validate(), "chunk_size"),
    (lambda: lirpa_patch.TrainConfig(lr=float("nan")).validate(), "lr"),
    (lambda: lirpa_patch.ImageModel(nn.Identity(), image_shape=(1, 4, 4), layout="nwhc"), "layout"),
    (lambda: lirpa_patch.ImageModel(nn.Identity(), image_shape=(1, 4, 4), mean=(0.5,)), "mean"),
    (lambda: lirpa_patch.load_model(nn.Identity()), "input_shape"),
    (lambda: certify(nn.Flatten(), torch.rand(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), chunk_size=0),
     "chunk_size"),
])
def test_usage_errors_name_the_python_parameter(call, param):
    error = _raises(call)
    assert error.param == param
    assert re.search(rf"(?<![\w-]){param}(?!\w)", str(error)), str(error)


# --------------------------------------------------------------------------- perturbation arguments


@pytest.mark.parametrize("kwargs, param", [
    ({"size": 2.5}, "size"),
    ({"size": None}, "size"),
    ({"size": "2x2x2"}, "size"),
    ({"size": (2, "a")}, "size"),
    ({"strength": "a"}, "strength"),
    ({"strength": None}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"locations": []}, "locations"),
    ({"locations": [[0.5, 1.0]]}, "locations"),
    ({"locations": [[0, 0, 0, 0]]}, "locations"),
    ({"mean": (0.5,), "std": (float("nan"),)}, "std"),
    ({"mean": (float("inf"),), "std": (0.5,)}, "mean"),
    ({"mean": ("a",), "std": (0.5,)}, "mean"),
    ({"std": (0.5,)}, "std"),
    ({"value_range": (0.0, float("nan"))}, "value_range"),
    ({"value_range": 3}, "value_range"),
])
def test_bad_patch_perturbation_arguments_are_one_line_usage_errors(kwargs, param):
    assert _raises(lambda: PatchPerturbation(**kwargs)).param == param


@pytest.mark.parametrize("kwargs, param", [
    ({"k": 2.5}, "k"), ({"k": 2, "strength": "a"}, "strength"), ({"k": 2, "std": [float("nan")], "mean": [0]}, "std"),
])
def test_bad_sparse_perturbation_arguments_are_one_line_usage_errors(kwargs, param):
    assert _raises(lambda: SparsePerturbation(**kwargs)).param == param


def test_pixel_domain_rejects_nan_std_and_a_lone_mean():
    assert _raises(lambda: PixelDomain(mean=(0.1,), std=(float("nan"),))).param == "std"
    assert _raises(lambda: PixelDomain(mean=(0.1,))).param == "mean"


def test_a_huge_patch_is_refused_before_any_mask_is_built(monkeypatch):
    from lirpa_patch import shapes

    def no_allocation(*args):
        raise AssertionError("a mask was built")

    monkeypatch.setattr(shapes, "_block", no_allocation)
    monkeypatch.setattr(shapes, "diamond_mask", no_allocation)
    for name in ("square", "line", "diamond", "rectangle"):
        error = _raises(lambda: shapes.make_shape(name, (100_000_000_000, 2), image_size=(28, 28)))
        assert error.param == "size" and "larger than the 28x28 image" in str(error)
        assert _raises(lambda: shapes.make_shape(name, "100000000000x2")).param == "size"
    assert _raises(lambda: shapes.make_shape("rectangle:100000x100000", 2, image_size=(28, 28))).param == "shape"


def test_a_sparse_budget_is_checked_against_the_image():
    from lirpa_patch.threats.sparse import check_budget

    assert check_budget(16, (1, 4, 4)) == 16
    error = _raises(lambda: check_budget(17, (1, 4, 4)))
    assert error.param == "k" and "17 exceeds the 16 pixels of a 4x4 image" in str(error)
    assert _raises(lambda: check_budget(2.5, (1, 4, 4))).param == "k"


# --------------------------------------------------------------------------- one label rule


def test_the_trainer_applies_the_certify_label_rule_to_validation_labels():
    from lirpa_patch.train import TrainConfig, Trainer

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    config = TrainConfig(patch="2x2", epochs=1, eval_every=0)
    with pytest.raises(DataError, match=r"^validation labels: 1 label\(s\) out of range for a model with 3 outputs"):
        Trainer(net, config, x, torch.tensor([0, 1, 2, 0, 1, 2]), x[:2], torch.tensor([0, 3]))
    with pytest.raises(DataError, match=r"^training labels: .* out of range for a model with 3 outputs"):
        Trainer(net, config, x, torch.tensor([0, 1, 2, 0, 1, 5]))


def test_the_trainer_checks_the_sparse_budget_against_the_image():
    from lirpa_patch.train import TrainConfig, Trainer

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    config = TrainConfig(sparse=100_000_000_000, epochs=1, eval_every=0)
    error = _raises(lambda: Trainer(net, config, torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])))
    assert error.param == "sparse" and "16 pixels" in str(error)


# --------------------------------------------------------------------------- the engine sizes progress bars


def test_certify_announces_its_totals_before_bounding():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.rand(5, 1, 4, 4)
    labels = net(images).argmax(1)
    labels[1] = (labels[1] + 1) % 3  # one misclassified image: not bounded
    calls = []

    class Progress:
        def start(self, images: int, locations: int) -> None:
            calls.append(("start", images, locations))

        def __call__(self, images_done: int, locations_done: int) -> None:
            calls.append(("step", images_done, locations_done))

    certify(net, images, labels, size=2, progress=Progress())
    assert calls[0] == ("start", 4, 4 * 9)
    assert calls[-1] == ("step", 4, 4 * 9)


# --------------------------------------------------------------------------- fast paths, packaging


def _run_cli(*args: str) -> tuple[int, bool]:
    """Exit code of ``lirpa-patch args`` in a fresh interpreter, and whether it imported torch."""
    code = (
        "import sys\n"
        "from lirpa_patch_cli.main import main\n"
        f"sys.argv = ['lirpa-patch', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('EXIT', code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[2] == "True"


def test_help_and_a_missing_model_file_do_not_import_torch(tmp_path):
    assert _run_cli("--help") == (0, False)
    assert _run_cli("certify", "--help") == (0, False)
    assert _run_cli("certify", str(tmp_path / "missing.onnx")) == (1, False)


# The wheel (every package, the data, no top-level `cli`, installed and run outside the
# checkout) is tested in tests/test_packaging.py.
