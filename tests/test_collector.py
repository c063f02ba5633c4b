"""The broker's garbage-collector settings (``trioq broker --gc-tuning``, on by default)."""

from __future__ import annotations

import gc

from click.testing import CliRunner

from trioq.broker.collector import BROKER_THRESHOLDS, tune_collector
from trioq.cli import main


def test_tuning_makes_collections_rarer_and_returns_what_it_replaced():
    before = gc.get_threshold()
    try:
        assert tune_collector() == before
        assert gc.get_threshold() == BROKER_THRESHOLDS
        young, middle, old = BROKER_THRESHOLDS
        assert young >= 10 * 700 and old >= 10  # far rarer young and full collections than CPython's
    finally:
        gc.set_threshold(*before)


def test_the_switch_is_a_flag_and_bad_values_are_refused():
    runner = CliRunner()
    out = runner.invoke(main, ["broker", "--help"])
    assert out.exit_code == 0 and "--no-gc-tuning" in out.output
    bad = runner.invoke(main, ["broker", "--port", "0"], env={"TRIOQ_GC_TUNING": "perhaps"})
    assert bad.exit_code == 2 and "gc-tuning" in bad.output.lower()
