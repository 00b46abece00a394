"""trio_kv.vllm imports vLLM only when vLLM asks for the connector class."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, trio_kv.vllm.scheduler, trio_kv.vllm.worker; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_asking_for_the_connector_without_vllm_says_what_is_missing():
    import trio_kv.vllm

    with pytest.raises(ImportError, match="needs vLLM"):
        trio_kv.vllm.TrioKVConnector  # noqa: B018
