"""Fixtures of the chart tests: a folder of kubeconform schemas made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from helm_helpers import schema_dir


@pytest.fixture(scope="session")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return schema_dir(tmp_path_factory.mktemp("kubeconform-schemas"))
