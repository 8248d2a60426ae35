"""Convolution plugin operator: the threat's first-layer rule, then windows while they are small.

* An element-state input (the first convolution): the sparse threat computes the
  exact top-k bound per output; the patch threat convolves the clean image once
  and, per row, only the window of outputs the patch reaches (a window state).
* A window-state input (a later convolution): the window grows by the receptive
  field (:func:`~lirpa_patch.ops.window.conv_window`); once it would cover the
  whole map the rows are made dense and later layers are stock IBP.
"""

from __future__ import annotations

from auto_LiRPA import bound_ops as _ops

from .base import Plugin, Unsupported, emit_window
from .linear import _check_sparse_root
from .state import WindowState
from .window import conv_window

__all__ = ["PluginConv"]


class PluginConv(Plugin, _ops.BoundConv):
    _lp_data_inputs = (0,)
    _lp_first_mixing = False

    def _lp_propagate(self, v, found, C=None, **kwargs):
        st, ptb = found[0]
        if st is None or any(f[0] is not None for f in found[1:]) or C is not None:
            raise Unsupported("a perturbed or merged convolution")
        if any(self.is_input_perturbed(i) for i in range(1, len(v))):
            raise Unsupported("perturbed weights")
        weight = v[1][0]
        bias = v[2][0] if len(v) > 2 else None
        if weight.dim() != 4 or getattr(self, "conv_dim", 2) != 2:
            raise Unsupported("not a 2-D convolution")
        if isinstance(st, WindowState):
            if st.flat:
                raise Unsupported("a convolution of a flattened window")
            out = conv_window(st, weight, bias, self.stride, self.padding, self.dilation, self.groups)
            return emit_window(self, ptb, out)
        out = ptb.mix_conv(self, st, weight, bias)
        if out is None:
            raise Unsupported("the threat's first-layer rule does not apply")
        if isinstance(out, WindowState):
            return emit_window(self, ptb, out)
        return out

    def _lp_no_state(self, v, **kwargs) -> None:
        if getattr(self, "_lp_first_mixing", False):
            _check_sparse_root(self, v)
