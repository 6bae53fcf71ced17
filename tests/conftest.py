"""Shared pytest configuration: hypothesis profiles for the fuzz suite (tests/test_fuzz.py).

``ci`` (the default) is derandomized and bounded so the suite stays fast and reproducible;
``deep`` runs many more examples (``pytest tests/test_fuzz.py --hypothesis-profile=deep``).
The long, multi-process fuzz run is ``python benchmarks/fuzz_long.py --cases 10000``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=3000,
    derandomize=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")
