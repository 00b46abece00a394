"""Describing a vLLM worker's KV tensors for RegisterKVCache (the CPU path: shared memory)."""

from __future__ import annotations

import pytest
import torch
import trio

from trio_kv.client import BlockingClient
from trio_kv.testing import make_kv_cache
from trio_kv.vllm.registration import block_dim, kv_cache_registration, parse_maps

MAPS = """\
7f0000000000-7f0000100000 rw-s 00002000 00:1a 123  /dev/shm/trio-kv-1-abc
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
7f0000200000-7f0000300000 r--p 00000000 08:01 77   /usr/lib/libc.so.6
7f0000300000-7f0000400000 rw-s 00000000 00:1a 124  /dev/shm/gone (deleted)
"""


def layers(cache):
    return {f"model.layers.{i}.self_attn": tensor for i, tensor in enumerate(cache.tensors)}


def test_file_mappings_are_read_from_proc_maps():
    shm, libc, deleted = parse_maps(MAPS.splitlines())
    assert shm == (0x7F0000000000, 0x7F0000100000, 0x2000, True, "/dev/shm/trio-kv-1-abc")
    assert libc.shared is False
    assert deleted.path == "/dev/shm/gone (deleted)"


@pytest.mark.parametrize(
    ("shape", "dim"), [((2, 64, 16, 2, 8), 1), ((64, 2, 2, 16, 2, 8), 0), ((64, 16, 576), 0)]
)
def test_the_block_dimension_is_found_in_vllms_layouts(shape, dim):
    assert block_dim(shape, 64) == dim


@pytest.mark.parametrize("shape", [(2, 63, 16), (64, 64, 16)])
def test_an_unknown_or_ambiguous_layout_is_refused(shape):
    with pytest.raises(ValueError):
        block_dim(shape, 64)


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
def test_shared_memory_tensors_are_described_as_their_creator_describes_them(layout):
    with make_kv_cache(num_blocks=32, block_size=16, layout=layout, sealed=False) as cache:
        request = kv_cache_registration("w", layers(cache), block_size=16, num_blocks=32)
        assert request == cache.register_request("w")


def test_layers_sharing_one_tensor_are_registered_once():
    with make_kv_cache(num_blocks=32, block_size=16, num_layers=2, sealed=False) as cache:
        kv_caches = layers(cache)
        kv_caches["model.layers.2.self_attn"] = cache.tensors[0]
        request = kv_cache_registration("w", kv_caches, block_size=16, num_blocks=32)
        assert len(request.tensors) == 2


def test_private_memory_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="not in a shared-memory file"):
        kv_cache_registration("w", {"l0": torch.zeros(2, 32, 16, 2, 8)}, block_size=16, num_blocks=32)


def test_tensors_in_two_files_are_refused():
    with (
        make_kv_cache(num_blocks=32, sealed=False) as first,
        make_kv_cache(num_blocks=32, sealed=False) as second,
    ):
        kv_caches = {"l0": first.tensors[0], "l1": second.tensors[0]}
        with pytest.raises(ValueError, match="two files"):
            kv_cache_registration("w", kv_caches, block_size=16, num_blocks=32)


async def test_the_server_accepts_the_registration(server):
    with make_kv_cache(num_blocks=32, block_size=16, sealed=False) as cache:
        request = kv_cache_registration("w", layers(cache), block_size=16, num_blocks=32)

        def register():
            with BlockingClient.connect(server.url) as client:
                return client.register(request)

        registered = await trio.to_thread.run_sync(register)
        assert registered.num_blocks == 32
