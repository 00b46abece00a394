"""Configuration: byte sizes, precedence (defaults < TOML < environment < flags), and
rejection of unknown or invalid settings with a message that names them."""

import json

import msgspec
import pytest

from trio_kv.server.config import DEFAULT_LISTEN, ConfigError, ServerConfig, config_json, load_config
from trio_kv.sizes import parse_size

GiB = 1024**3

# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("8GiB", 8 * GiB),
        ("8gib", 8 * GiB),
        ("512MB", 512 * 1000**2),
        ("512MiB", 512 * 1024**2),
        ("1.5G", 3 * GiB // 2),
        ("16K", 16 * 1024),
        ("16KB", 16_000),
        ("2T", 2 * 1024**4),
        ("3TB", 3 * 1000**4),
        ("100B", 100),
        (" 64 MiB ", 64 * 1024**2),
        ("2.5KB", 2500),
        ("2.01KB", 2010),
        ("0.5K", 512),
    ],
)
def test_parse_size_reads_human_sizes(text, expected):
    assert parse_size(text) == expected


def test_parse_size_keeps_large_integers_exact():
    assert parse_size("9007199254740993") == 9007199254740993
    assert parse_size("123456789012345678901") == 123456789012345678901


def test_parse_size_passes_integers_through():
    assert parse_size(12345) == 12345


@pytest.mark.parametrize(
    "text",
    ["", "GiB", "-1", "-1GiB", "1.5.5G", "8 gigabytes", "8XB", "0x10", "1e3", ".5G", "1,024"],
)
def test_parse_size_rejects_bad_strings(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("value", [-1, True])
def test_parse_size_rejects_negative_and_boolean_values(value):
    with pytest.raises(ValueError):
        parse_size(value)


# ---------------------------------------------------------------- precedence


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "trio-kv.toml"
    path.write_text(text)
    return str(path)


def test_defaults_apply_without_any_source():
    config = load_config(environ={})
    assert config == ServerConfig()
    assert config.listen == [DEFAULT_LISTEN]


def test_toml_file_overrides_defaults(tmp_path):
    path = write_toml(
        tmp_path, 'chunk_size = 512\nl1_size = "1GiB"\nlisten = ["tcp://127.0.0.1:5555"]\ndata_token = "t"\n'
    )
    config = load_config(path=path, environ={})
    assert config.chunk_size == 512
    assert config.l1_size == GiB
    assert config.listen == ["tcp://127.0.0.1:5555"]
    assert config.workers == ServerConfig().workers


def test_environment_overrides_toml(tmp_path):
    path = write_toml(tmp_path, "chunk_size = 512\nworkers = 8\n")
    config = load_config(path=path, environ={"TRIO_KV_CHUNK_SIZE": "128"})
    assert config.chunk_size == 128
    assert config.workers == 8


def test_overrides_beat_environment_and_toml(tmp_path):
    path = write_toml(tmp_path, "chunk_size = 512\n")
    config = load_config(path=path, environ={"TRIO_KV_CHUNK_SIZE": "128"}, overrides={"chunk_size": 64})
    assert config.chunk_size == 64


def test_none_overrides_are_ignored():
    config = load_config(environ={"TRIO_KV_CHUNK_SIZE": "128"}, overrides={"chunk_size": None})
    assert config.chunk_size == 128


def test_config_path_can_come_from_the_environment(tmp_path):
    path = write_toml(tmp_path, "workers = 3\n")
    assert load_config(environ={"TRIO_KV_CONFIG": path}).workers == 3


def test_explicit_path_beats_the_environment_path(tmp_path):
    explicit = write_toml(tmp_path, "workers = 3\n")
    other = tmp_path / "other.toml"
    other.write_text("workers = 5\n")
    assert load_config(path=explicit, environ={"TRIO_KV_CONFIG": str(other)}).workers == 3


def test_environment_values_are_converted_to_field_types():
    config = load_config(
        environ={
            "TRIO_KV_L1_SIZE": "512MiB",
            "TRIO_KV_MAX_MESSAGE_BYTES": "1MB",
            "TRIO_KV_LEASE_TTL_S": "2.5",
            "TRIO_KV_LOG_LEVEL": "debug",
        }
    )
    assert config.l1_size == 512 * 1024**2
    assert config.max_message_bytes == 1_000_000
    assert config.lease_ttl_s == 2.5
    assert config.log_level == "debug"


def test_environment_listen_is_a_comma_list():
    config = load_config(
        environ={"TRIO_KV_LISTEN": "ipc:///tmp/a.sock, tcp://127.0.0.1:7000,", "TRIO_KV_DATA_TOKEN": "t"}
    )
    assert config.listen == ["ipc:///tmp/a.sock", "tcp://127.0.0.1:7000"]


def test_unrelated_environment_variables_are_ignored():
    assert load_config(environ={"HOME": "/root", "TRIO_KVX": "1"}) == ServerConfig()


def test_dashed_override_names_are_accepted():
    assert load_config(environ={}, overrides={"copy-threads": 4}).copy_threads == 4


# ---------------------------------------------------------------- rejection


def test_unknown_toml_key_is_rejected_naming_it(tmp_path):
    path = write_toml(tmp_path, "chunk_sise = 512\n")
    with pytest.raises(ConfigError, match="chunk_sise"):
        load_config(path=path, environ={})


def test_unknown_environment_key_is_rejected_naming_it():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(environ={"TRIO_KV_BOGUS": "1"})


def test_unknown_override_is_rejected_naming_it():
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(environ={}, overrides={"nonsense": 1})


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(path=str(tmp_path / "absent.toml"), environ={})


def test_malformed_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(path=write_toml(tmp_path, "chunk_size = = 1\n"), environ={})


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"workers": -1}, "workers"),
        ({"l1_size": 0}, "l1_size"),
        ({"request_timeout_s": 0.0}, "request_timeout_s"),
        ({"evict_low_watermark": 0.95, "evict_high_watermark": 0.9}, "watermark"),
        ({"evict_high_watermark": 1.5}, "watermark"),
        ({"evict_low_watermark": 0.0}, "watermark"),
        ({"listen": ["http://127.0.0.1:80"]}, "listen"),
        ({"listen": []}, "listen"),
        ({"log_level": "verbose"}, "log_level"),
        ({"transfer": "gpu-magic"}, "transfer"),
    ],
)
def test_invalid_values_are_rejected_naming_the_setting(settings, named):
    with pytest.raises(ConfigError, match=named):
        load_config(environ={}, overrides=settings)


def test_bad_listen_scheme_in_the_environment_is_rejected():
    with pytest.raises(ConfigError, match="listen"):
        load_config(environ={"TRIO_KV_LISTEN": "udp://0.0.0.0:1"})


def test_bad_size_is_a_config_error_naming_the_setting():
    with pytest.raises(ConfigError, match="l1_size"):
        load_config(environ={"TRIO_KV_L1_SIZE": "lots"})


def test_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(environ={"TRIO_KV_CHUNK_SIZE": "big"})


def test_log_level_is_case_insensitive():
    assert load_config(environ={"TRIO_KV_LOG_LEVEL": "WARNING"}).log_level == "WARNING"


# ---------------------------------------------------------------- output


def test_config_json_is_valid_json_with_every_field():
    config = load_config(environ={}, overrides={"chunk_size": 64, "l1_size": "1GiB"})
    parsed = json.loads(config_json(config))
    assert set(parsed) == set(ServerConfig.__struct_fields__)
    assert parsed["chunk_size"] == 64
    assert parsed["l1_size"] == GiB


def test_config_json_round_trips():
    config = load_config(
        environ={"TRIO_KV_LISTEN": "ipc:///tmp/x.sock,tcp://127.0.0.1:1", "TRIO_KV_DATA_TOKEN": "t"},
        overrides={"evict_low_watermark": 0.5, "shm_dir": "/tmp"},
    )
    assert msgspec.json.decode(config_json(config), type=ServerConfig) == config


def test_config_json_can_be_fed_back_as_a_toml_equivalent(tmp_path):
    config = load_config(environ={}, overrides={"chunk_size": 64, "workers": 7})
    lines = [f"{name} = {json.dumps(value)}" for name, value in json.loads(config_json(config)).items()]
    assert load_config(path=write_toml(tmp_path, "\n".join(lines)), environ={}) == config


def test_the_non_temporal_threshold_is_a_size_0_or_at_least_64_kib():
    assert load_config(environ={"TRIO_KV_COPY_NT_THRESHOLD": "1MiB"}).copy_nt_threshold == 1 << 20
    assert load_config(environ={"TRIO_KV_COPY_NT_THRESHOLD": "0"}).copy_nt_threshold == 0
    with pytest.raises(ConfigError, match="copy_nt_threshold"):
        load_config(environ={"TRIO_KV_COPY_NT_THRESHOLD": "32KiB"})
