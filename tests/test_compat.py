"""The auto_LiRPA 0.3 shims (``lirpa_patch._compat``): auto_LiRPA imports and bounds correctly, and
every shim is idempotent and a no-op where the environment already provides what it adds."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lirpa_patch  # noqa: F401  (applies the shims before auto_LiRPA)
from lirpa_patch import _compat
from auto_LiRPA import BoundedModule, BoundedTensor
from auto_LiRPA.perturbations import PerturbationLpNorm
from tests.reference_ibp import interval_forward

EPS = (0.01, 0.05)


@pytest.fixture(scope="module")
def conv_net():
    """Conv-ReLU-Conv-ReLU-Flatten-Linear on (1, 8, 8), random init, and a batch of inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return net, BoundedModule(net, torch.zeros(1, 1, 8, 8)), x


def _bounds(bounded, x, eps, method):
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps)
    with torch.no_grad():
        return bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)


@pytest.mark.parametrize("eps", EPS)
def test_auto_lirpa_ibp_equals_plain_pytorch_ibp(eps, conv_net):
    net, bounded, x = conv_net
    lb, ub = _bounds(bounded, x, eps, "IBP")
    ref_lb, ref_ub = interval_forward(net, x - eps, x + eps)
    torch.testing.assert_close(lb, ref_lb, atol=1e-5, rtol=0)
    torch.testing.assert_close(ub, ref_ub, atol=1e-5, rtol=0)
    assert bool((ub - lb > 1e-3).any())  # the box is not degenerate


@pytest.mark.parametrize("eps", EPS)
def test_crown_lower_bound_is_at_least_ibp(eps, conv_net):
    _, bounded, x = conv_net
    ibp_lb, ibp_ub = _bounds(bounded, x, eps, "IBP")
    crown_lb, crown_ub = _bounds(bounded, x, eps, "CROWN")
    assert bool((crown_lb >= ibp_lb - 1e-5).all())
    assert bool((crown_ub <= ibp_ub + 1e-5).all())
    assert bool((crown_lb > ibp_lb + 1e-4).any())  # CROWN actually differs from IBP


@pytest.mark.parametrize("eps", EPS)
def test_crown_bounds_contain_sampled_outputs(eps, conv_net):
    net, bounded, x = conv_net
    lb, ub = _bounds(bounded, x, eps, "CROWN")
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        uniform = x + eps * (2 * torch.rand(x.shape, generator=g) - 1)
        corner = x + eps * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
        for sample in (uniform, corner):
            with torch.no_grad():
                out = net(sample)
            assert bool((out >= lb - 1e-5).all()) and bool((out <= ub + 1e-5).all())


def test_crown_with_specification_matrix_matches_bounds_of_differences(conv_net):
    """C merges into the last layer; with eps = 0 every method returns C @ f(x) exactly."""
    net, bounded, x = conv_net
    C = torch.zeros(4, 2, 5)
    C[:, 0, 0], C[:, 0, 1] = 1, -1
    C[:, 1, 2], C[:, 1, 4] = 1, -1
    with torch.no_grad():
        exact = (C @ net(x).unsqueeze(-1)).squeeze(-1)
        for method in ("IBP", "CROWN"):
            lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=0.0)),),
                                            C=C, method=method)
            torch.testing.assert_close(lb, exact, atol=1e-5, rtol=0)
            torch.testing.assert_close(ub, exact, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the shims

needs_shims = pytest.mark.skipif(
    not _compat.auto_lirpa_needs_shims(),
    reason="this auto_LiRPA (>= 0.6) needs no shims, so lirpa_patch applies none and changes nothing",
)



@needs_shims
def test_numpy_arraysetops_shim_provides_isin():
    module = sys.modules["numpy.lib.arraysetops"]
    assert module.isin(np.array([1, 2, 3]), [2]).tolist() == [False, True, False]


@needs_shims
def test_set_opset_version_shim_sets_the_exporter_global():
    import torch.onnx.symbolic_helper as symbolic_helper

    globals_module = _compat._exporter_module("_globals")
    if globals_module is None or not hasattr(globals_module, "GLOBALS"):
        pytest.skip("this torch has no TorchScript exporter globals")
    before = globals_module.GLOBALS.export_onnx_opset_version
    try:
        symbolic_helper._set_opset_version(13)
        assert globals_module.GLOBALS.export_onnx_opset_version == 13
    finally:
        globals_module.GLOBALS.export_onnx_opset_version = before


@needs_shims
def test_node_getitem_shim_reads_node_attributes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        graph = torch.jit.trace(lambda t: t * 2.5, torch.ones(2)).graph
    constants = [n for n in graph.nodes() if n.kind() == "prim::Constant" and "value" in n.attributeNames()]
    assert constants
    values = [n["value"] for n in constants]
    assert any(float(v) == 2.5 for v in values if isinstance(v, torch.Tensor))


def _shim_state():
    import torch.onnx.symbolic_helper as symbolic_helper

    return (
        sys.modules.get("numpy.lib.arraysetops"),
        getattr(symbolic_helper, "_set_opset_version", None),
        getattr(torch._C.Node, "__getitem__", None),
    )


def test_apply_twice_changes_nothing(monkeypatch):
    before = _shim_state()
    _compat.apply()
    assert _shim_state() == before
    monkeypatch.setattr(_compat, "_APPLIED", False)  # force the shims to run again
    _compat.apply()
    assert _shim_state() == before


@needs_shims
@pytest.mark.parametrize(
    "shim", [_compat._shim_numpy_arraysetops, _compat._shim_set_opset_version, _compat._shim_node_getitem]
)
def test_each_shim_is_idempotent(shim):
    before = _shim_state()
    shim()
    shim()
    assert _shim_state() == before


def test_numpy_shim_is_noop_where_numpy_has_arraysetops(monkeypatch):
    native = types.ModuleType("numpy.lib.arraysetops")
    monkeypatch.setitem(sys.modules, "numpy.lib.arraysetops", native)
    _compat._shim_numpy_arraysetops()
    assert sys.modules["numpy.lib.arraysetops"] is native


def test_opset_shim_is_noop_where_torch_has_set_opset_version(monkeypatch):
    import torch.onnx.symbolic_helper as symbolic_helper

    def native(opset_version):  # stands in for torch < 2's own function
        return None

    monkeypatch.setattr(symbolic_helper, "_set_opset_version", native, raising=False)
    _compat._shim_set_opset_version()
    assert symbolic_helper._set_opset_version is native


def test_node_shim_is_noop_where_node_has_getitem(monkeypatch):
    def native(node, key):  # stands in for torch < 2's own Node.__getitem__
        return None

    monkeypatch.setattr(torch._C.Node, "__getitem__", native, raising=False)
    _compat._shim_node_getitem()
    assert torch._C.Node.__getitem__ is native


def test_quiet_import_leaves_global_warning_filters_untouched():
    filters = list(warnings.filters)
    simplefilter = warnings.simplefilter
    with _compat.quiet_import():
        warnings.simplefilter("once")  # what auto_LiRPA does at import time
    assert warnings.simplefilter is simplefilter
    assert warnings.filters == filters


# ----------------------------------------------------------------------------- which auto_LiRPA needs them


def _fake_auto_lirpa(monkeypatch, tmp_path, init_text):
    """Make importlib find an auto_LiRPA package whose __init__.py is ``init_text`` (nothing is imported)."""
    import importlib.util

    init = tmp_path / "auto_LiRPA" / "__init__.py"
    init.parent.mkdir()
    init.write_text(init_text)
    spec = importlib.util.spec_from_file_location("auto_LiRPA", init)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "auto_LiRPA" else real(name, *a))


@pytest.mark.parametrize("text, version, needs", [
    ("from .x import y\n__version__ = '0.3'\n", (0, 3), True),
    ("# header\n__version__ = '0.7.1'\n", (0, 7, 1), False),
    ('__version__ = "0.6.0"\n', (0, 6, 0), False),
    ("from .version import __version__\n", None, True),  # unknown: the shims only add missing names
])
def test_needs_shims_is_read_from_the_auto_lirpa_source(monkeypatch, tmp_path, text, version, needs):
    _fake_auto_lirpa(monkeypatch, tmp_path, text)
    assert _compat.auto_lirpa_source_version() == version
    assert _compat.auto_lirpa_needs_shims() is needs


@pytest.mark.parametrize("text, applied", [("__version__ = '0.7.1'\n", False), ("__version__ = '0.3'\n", True)])
def test_apply_runs_the_shims_only_for_an_auto_lirpa_that_needs_them(monkeypatch, tmp_path, text, applied):
    _fake_auto_lirpa(monkeypatch, tmp_path, text)
    calls = []
    for name in ("_shim_numpy_arraysetops", "_shim_set_opset_version", "_shim_node_getitem"):
        monkeypatch.setattr(_compat, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(_compat, "_APPLIED", False)
    _compat.apply()
    assert len(calls) == (3 if applied else 0)
