"""The connector's settings (``kv_connector_extra_config``) and its start-up checks."""

from __future__ import annotations

import pytest

from trio_kv.vllm.config import DEFAULT_URL, ConnectorConfig, config_from_extra
from trio_kv.vllm.connection import check_chunk_size


def test_defaults_need_no_extra_config():
    assert config_from_extra(None, environ={}) == ConnectorConfig()
    assert ConnectorConfig().url == DEFAULT_URL == "ipc:///tmp/trio-kv.sock"


def test_keys_are_read_with_their_prefix():
    config = config_from_extra(
        {"trio_kv.url": "tcp://10.0.0.1:7000", "trio_kv.threads": 8, "trio_kv.async_load": False},
        environ={},
    )
    assert (config.url, config.threads, config.async_load) == ("tcp://10.0.0.1:7000", 8, False)


def test_keys_of_other_connectors_are_left_alone():
    assert config_from_extra({"connectors": [], "lmcache.chunk_size": 256}, environ={}) == ConnectorConfig()


def test_a_misspelt_key_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"trio_kv\.ulr.*trio_kv\.url"):
        config_from_extra({"trio_kv.ulr": "ipc:///x"}, environ={})


def test_the_url_defaults_to_the_environment():
    assert config_from_extra({}, environ={"TRIO_KV_URL": "ipc:///run/kv.sock"}).url == "ipc:///run/kv.sock"
    explicit = config_from_extra({"trio_kv.url": "ipc:///a"}, environ={"TRIO_KV_URL": "ipc:///b"})
    assert explicit.url == "ipc:///a"


def test_strings_from_a_json_line_are_converted():
    assert config_from_extra({"trio_kv.timeout_s": "2.5"}, environ={}).timeout_s == 2.5


@pytest.mark.parametrize(
    "extra", [{"trio_kv.threads": 0}, {"trio_kv.timeout_s": 0}, {"trio_kv.url": ""}, {"trio_kv.threads": "x"}]
)
def test_bad_values_stop_start_up(extra):
    with pytest.raises(ValueError):
        config_from_extra(extra, environ={})


def test_a_chunk_of_whole_blocks_is_accepted():
    check_chunk_size(256, 16)
    check_chunk_size(32, 32)


@pytest.mark.parametrize(("chunk_size", "block_size"), [(48, 32), (256, 3), (16, 32)])
def test_a_chunk_that_is_not_whole_blocks_is_a_clear_error(chunk_size, block_size):
    with pytest.raises(ValueError, match=rf"chunk size \({chunk_size} tokens\) is not a multiple"):
        check_chunk_size(chunk_size, block_size)
