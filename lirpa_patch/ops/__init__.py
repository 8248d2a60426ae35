"""Plugin bound operators for auto_LiRPA, one family per module.

* :mod:`.state` — the compact descriptions operators pass to each other;
* :mod:`.window` — interval arithmetic on patch windows (plain tensor code);
* :mod:`.elementwise`, :mod:`.shape`, :mod:`.activation`, :mod:`.linear`,
  :mod:`.conv` — the operators;
* :mod:`.graph` — graph facts; :mod:`.registry` — factories, :func:`custom_ops`.
"""

from .registry import bounded_module, custom_ops, is_registered, plugin_report, register, stock_ops, unregister

__all__ = ["bounded_module", "custom_ops", "is_registered", "plugin_report", "register", "stock_ops", "unregister"]
