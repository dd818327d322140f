"""Steps of embedded_worker.feature (all shared; see conftest.py)."""

from __future__ import annotations

from pytest_bdd import scenarios

scenarios("embedded_worker.feature")
