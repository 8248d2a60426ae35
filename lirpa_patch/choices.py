"""The names the library accepts where a parameter is one of a few choices, as plain tuples.

This module imports nothing, so the command line can offer the choices (and
``lirpa-patch --help`` list them) without importing torch: it loads this file on its own
(``cli/_choices.py``). The modules that take each choice define what it means;
where one keeps its own table of the names, it is built from the tuple here or a test
checks that the two agree (``tests/test_choices.py``).
"""

ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn2", "cnn4", "cnn4conv11", "cnn4conv13", "cnn5wide")
"""The paper's architectures (:data:`lirpa_patch.models.architectures.ARCHITECTURES`)."""

STRATEGIES: tuple[str, ...] = ("all", "random", "guided", "pool", "guided-per-label")
"""Training strategies (:func:`lirpa_patch.train.strategies.make_strategy`)."""

INITS: tuple[str, ...] = ("keep", "ibp")
"""Weight initialisations of a training run (:data:`lirpa_patch.train.init.INITIALISERS`)."""

PRESETS: tuple[str, ...] = ("auto", "mnist", "cifar")
"""Training presets (:func:`lirpa_patch.train.presets.preset_for`; ``auto`` picks by channels)."""

METHODS: tuple[str, ...] = ("ibp", "crown", "alpha-crown")
"""Bound methods (:data:`lirpa_patch.margins.METHODS`)."""

INTERMEDIATE: tuple[str, ...] = ("auto", "crown", "ibp")
"""How CROWN bounds the pre-activations (:data:`lirpa_patch.crown.INTERMEDIATE`)."""

LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "flat")
"""How a model takes images (:data:`lirpa_patch.threats.box.LAYOUTS`)."""

LOSSES: tuple[str, ...] = ("margin", "ce")
"""What an attack minimises (:data:`lirpa_patch.attacks.Loss`)."""

DEVICES: tuple[str, ...] = ("cpu", "cuda")
"""Kinds of device (:func:`lirpa_patch.devices.resolve`; ``"cuda:1"`` names one GPU)."""
