"""pytest plugin: transformers' own generation tests, with ``hf_paged.enable`` applied to every model.

Every generative, decoder-only model the tests build is enabled as soon as it is constructed (the way
a user enables a model right after loading it), so whatever the tests then set on the model or pass to
``generate`` reaches ``enable``'s wrapper exactly as it would reach stock ``generate``. A few tests
assert implementation details that a paged cache cannot have (say, ``isinstance(cache, DynamicCache)``);
they are listed with their reasons in ``excluded_tests.txt`` beside this file and skipped with that
reason.

Use it by putting this folder on ``PYTHONPATH`` and passing ``-p hf_paged_enable_plugin`` to pytest.
"""

from __future__ import annotations

import fnmatch
import pathlib

import pytest

EXCLUDED_FILE = pathlib.Path(__file__).with_name("excluded_tests.txt")
# What the run did, reported at the end: models enabled, generate calls that ran with a PagedCache.
COUNTS = {"models enabled": 0, "paged generate calls": 0}


def load_excluded(path: pathlib.Path = EXCLUDED_FILE) -> dict[str, str]:
    """``{test name pattern: reason}`` from lines ``pattern: reason`` (``#`` starts a comment line)."""
    excluded: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(":")
        if not sep or not reason.strip():
            raise ValueError(f"{path}:{number}: expected 'test_name_pattern: reason', got {line!r}")
        excluded[pattern.strip()] = reason.strip()
    return excluded


def _enable_on_construction() -> None:
    import hf_paged
    from hf_paged import PagedCache
    from transformers import GenerationMixin, PreTrainedModel

    original_post_init = PreTrainedModel.post_init
    if getattr(original_post_init, "_hf_paged_plugin", False):
        return
    original_begin_call = PagedCache.begin_call

    def begin_call(self, *args, **kwargs):
        COUNTS["paged generate calls"] += 1
        return original_begin_call(self, *args, **kwargs)

    def post_init(self, *args, **kwargs):
        original_post_init(self, *args, **kwargs)
        config = getattr(self, "config", None)
        if (
            isinstance(self, GenerationMixin)
            and config is not None
            and not getattr(config, "is_encoder_decoder", False)
            and not hf_paged.is_enabled(self)
        ):
            hf_paged.enable(self)
            COUNTS["models enabled"] += 1

    post_init._hf_paged_plugin = True
    PreTrainedModel.post_init = post_init
    PagedCache.begin_call = begin_call


def pytest_configure(config: pytest.Config) -> None:
    _enable_on_construction()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    excluded = load_excluded()
    for item in items:
        for pattern, reason in excluded.items():
            if fnmatch.fnmatchcase(item.name, pattern):
                item.add_marker(pytest.mark.skip(reason=f"excluded under hf_paged.enable: {reason}"))
                break


def pytest_terminal_summary(terminalreporter) -> None:
    counts = ", ".join(f"{value} {name}" for name, value in COUNTS.items())
    terminalreporter.write_line(f"hf_paged: {counts}; {len(load_excluded())} excluded test patterns")
