"""lirpa_patch._messages: one line of an exception's message, and silence while a library works."""

from __future__ import annotations

import logging
import warnings

from lirpa_patch._messages import first_line, quiet


def test_first_line_of_a_one_line_message_is_the_message():
    assert first_line(ValueError("bad value")) == "bad value"


def test_first_line_keeps_only_the_first_line_of_a_longer_message():
    assert first_line(RuntimeError("size mismatch\n  at layer 3\n  in block 2")) == "size mismatch"


def test_first_line_skips_blank_lines_and_surrounding_spaces():
    assert first_line(RuntimeError("\n   \n  the reason  \nmore")) == "the reason"


def test_first_line_of_an_empty_message_is_the_type_name():
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_first_line_of_a_blank_message_is_the_type_name():
    assert first_line(OSError(" \n ")) == "OSError"


def test_first_line_of_a_blank_message_is_the_default_when_one_is_given():
    assert first_line(RuntimeError(""), default="") == ""


def test_the_default_does_not_replace_a_message():
    assert first_line(RuntimeError("why"), default="") == "why"


def test_quiet_hides_warnings_raised_inside_it(recwarn):
    with quiet():
        warnings.warn("noise", UserWarning)
    assert len(recwarn) == 0


def test_quiet_leaves_the_warning_filters_as_they_were():
    before = list(warnings.filters)
    with quiet():
        pass
    assert warnings.filters == before


def test_quiet_raises_a_named_logger_to_error_level_inside_it():
    logger = logging.getLogger("lirpa_patch.tests.quiet")
    logger.setLevel(logging.INFO)
    with quiet("lirpa_patch.tests.quiet"):
        assert logger.level == logging.ERROR
    assert logger.level == logging.INFO


def test_quiet_restores_the_loggers_level_after_an_error():
    logger = logging.getLogger("lirpa_patch.tests.quiet_error")
    logger.setLevel(logging.DEBUG)
    try:
        with quiet("lirpa_patch.tests.quiet_error"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert logger.level == logging.DEBUG
