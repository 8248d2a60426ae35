"""lirpa_patch.choices: the library's choice lists, the command line's option choices, and the
tables of the modules that take each choice all name the same things."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest

from lirpa_patch import attacks, choices, crown, margins
from lirpa_patch.models.architectures import ARCHITECTURE_NAMES, ARCHITECTURES, build_architecture
from lirpa_patch.threats.box import LAYOUTS
from lirpa_patch.train.presets import PRESET_NAMES, PRESETS
from lirpa_patch.train.strategies import STRATEGY_NAMES

ROOT = Path(__file__).resolve().parent.parent

REGISTRY_OF_OPTION = {
    "arch": choices.ARCHITECTURES,
    "strategy": choices.STRATEGIES,
    "preset": choices.PRESETS,
    "method": choices.METHODS,
    "intermediate": choices.INTERMEDIATE,
    "layout": choices.LAYOUTS,
    "loss": choices.LOSSES,
    "device": choices.DEVICES,
    "init": choices.INITS,
}
"""Which library registry each command-line option with a fixed set of choices offers."""


def _choice_options() -> list[tuple[str, str, tuple]]:
    from lirpa_patch_cli.main import app

    return [(name, param.name, tuple(param.type.choices))
            for name, command in sorted(app.commands.items())
            for param in command.params if isinstance(param.type, click.Choice)]


def test_every_choice_option_of_the_command_line_has_a_library_registry():
    unmapped = [(command, option) for command, option, _ in _choice_options() if option not in REGISTRY_OF_OPTION]
    assert not unmapped


def test_every_choice_option_offers_exactly_its_library_registry():
    differ = [(command, option, offered) for command, option, offered in _choice_options()
              if option in REGISTRY_OF_OPTION and offered != REGISTRY_OF_OPTION[option]]
    assert not differ


def test_the_choices_module_imports_nothing():
    tree = ast.parse((ROOT / "lirpa_patch" / "choices.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_the_architectures_are_those_build_architecture_accepts():
    assert choices.ARCHITECTURES == ARCHITECTURE_NAMES == tuple(ARCHITECTURES)


@pytest.mark.parametrize("name", choices.ARCHITECTURES)
def test_every_architecture_builds(name):
    assert build_architecture(name, 1, 28, 10) is not None


def test_the_strategies_are_those_make_strategy_accepts():
    assert choices.STRATEGIES == STRATEGY_NAMES


def test_the_initialisations_are_those_the_trainer_applies():
    from lirpa_patch.train.init import INITIALISERS

    assert tuple(INITIALISERS) == choices.INITS


def test_the_presets_are_auto_and_every_preset():
    assert choices.PRESETS == PRESET_NAMES == ("auto", *PRESETS)


def test_the_methods_are_those_of_the_margins():
    assert choices.METHODS == tuple(margins.METHODS)


def test_the_intermediate_bounds_are_those_crown_accepts():
    assert choices.INTERMEDIATE == crown.INTERMEDIATE


def test_the_layouts_are_those_of_the_box_threat():
    assert choices.LAYOUTS == LAYOUTS


def test_the_losses_are_those_an_attack_takes():
    assert choices.LOSSES == typing.get_args(attacks.Loss)


def test_train_help_does_not_import_torch():
    code = ("import sys\nfrom lirpa_patch_cli.main import main\nsys.argv = ['lirpa-patch', 'train', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False"
