"""Shared pytest configuration: hypothesis profiles and helpers used across suites."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# DESIGN §8: a "ci" profile with at least 500 examples per property and a deadline.
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=2000)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
