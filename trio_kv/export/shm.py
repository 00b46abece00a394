"""Shared-memory KV caches for the CPU path: the engine side creates them, the server maps them."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ErrorCode, TrioKVError
from ..protocol import RegisterKVCache, TensorSpec
from .memfd import SealedRegion, check_file_owner, create_sealed_region

DEFAULT_SHM_DIR = "/dev/shm"
_ALIGN = 4096


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def map_file(path: str, nbytes: int) -> torch.Tensor:
    """Map ``nbytes`` of a file as a shared (MAP_SHARED) uint8 tensor."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


@dataclass
class SharedKVCache:
    """KV tensors that live in one shared-memory file, as a CPU-path engine holds them.

    ``tensors[i]`` is described by ``specs[i]``; ``register_request`` builds the
    message that lets a trio-kv server map the same memory. The file is a sealed
    memfd (``sealed``; ``path`` is ``/proc/<pid>/fd/<fd>``) or a named file in a
    shared-memory directory. ``close`` closes the memfd or unlinks the file.
    """

    path: str
    nbytes: int
    block_size: int
    tensors: list[torch.Tensor]
    specs: list[TensorSpec]
    region: torch.Tensor = field(repr=False)
    sealed: SealedRegion | None = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        spec = self.specs[0]
        return spec.shape[spec.block_dim]

    def register_request(self, instance_id: str) -> RegisterKVCache:
        return RegisterKVCache(
            instance_id=instance_id,
            block_size=self.block_size,
            tensors=list(self.specs),
            shm_path=self.path,
            shm_bytes=self.nbytes,
        )

    def block_bytes(self, block_id: int) -> bytes:
        """Every byte of one block, tensor by tensor (for tests that compare blocks)."""
        parts = []
        for tensor, spec in zip(self.tensors, self.specs):
            parts.append(
                tensor.select(spec.block_dim, block_id).contiguous().view(torch.uint8).numpy().tobytes()
            )
        return b"".join(parts)

    def close(self) -> None:
        if self.sealed is not None:
            self.sealed.close()
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> SharedKVCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_shared_kv_cache(
    *,
    num_blocks: int,
    block_size: int = 16,
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    layout: str = "per_layer",
    directory: str = DEFAULT_SHM_DIR,
    fill: str = "random",
    sealed: bool = True,
) -> SharedKVCache:
    """Create a KV cache in shared memory: a sealed memfd, or with ``sealed=False`` a file in ``directory``.

    ``layout="per_layer"``: one tensor per layer shaped
    ``(2, num_blocks, block_size, num_kv_heads, head_size)`` (vLLM's FlashAttention
    layout, two pieces per block). ``layout="cross_layer"``: one tensor shaped
    ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_size)`` (one piece per block).
    ``fill`` is "random" or "zeros".
    """
    shapes: list[tuple[int, ...]]
    if layout == "per_layer":
        shapes = [(2, num_blocks, block_size, num_kv_heads, head_size)] * num_layers
        block_dim = 1
    elif layout == "cross_layer":
        shapes = [(num_blocks, num_layers, 2, block_size, num_kv_heads, head_size)]
        block_dim = 0
    else:
        raise ValueError(f"layout must be 'per_layer' or 'cross_layer', got {layout!r}")
    return create_shared_tensors(shapes, block_dim, block_size, dtype, directory, fill, sealed=sealed)


def create_shared_tensors(
    shapes: Sequence[Sequence[int]],
    block_dim: int,
    block_size: int,
    dtype: torch.dtype,
    directory: str = DEFAULT_SHM_DIR,
    fill: str = "random",
    *,
    sealed: bool = True,
) -> SharedKVCache:
    """Tensors of ``shapes`` in one shared region, each aligned to a page.

    ``sealed`` (the default): a memfd sealed against shrinking, which a server can map
    without any risk of SIGBUS. Otherwise a new file in ``directory``."""
    elem = torch.empty((), dtype=dtype).element_size()
    offsets, cursor = [], 0
    for shape in shapes:
        offsets.append(cursor)
        size = elem
        for n in shape:
            size *= n
        cursor += (size + _ALIGN - 1) // _ALIGN * _ALIGN
    seal: SealedRegion | None = None
    if sealed:
        seal = create_sealed_region(cursor, name="trio-kv-kv-cache")
        path, region = seal.path, seal.tensor.view(torch.uint8)
    else:
        path = os.path.join(directory, f"trio-kv-{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, cursor)
        finally:
            os.close(fd)
        region = map_file(path, cursor)
    tensors, specs = [], []
    for shape, offset in zip(shapes, offsets):
        count = 1
        for n in shape:
            count *= n
        tensor = region[offset : offset + count * elem].view(dtype).view(*shape)
        if fill == "random":
            tensor.copy_(torch.randn(tuple(shape), dtype=torch.float32).to(dtype))
        tensors.append(tensor)
        specs.append(
            TensorSpec(offset, dtype_name(dtype), list(tensor.shape), list(tensor.stride()), block_dim)
        )
    return SharedKVCache(path, cursor, block_size, tensors, specs, region, seal)


def open_registered_file(request: RegisterKVCache, allowed_dir: str, owner_uid: int | None = None) -> int:
    """Open a client's plain shared-memory file (O_RDWR) after checking where it is, how
    large it is and (``owner_uid`` given) that the client owns it; returns the descriptor.
    The server copies through it with preadv/pwritev and never maps it: the file can be
    truncated under the server, and a mapping touched past a shrunken file's end raises SIGBUS."""
    path = os.path.realpath(request.shm_path)
    root = os.path.realpath(allowed_dir)
    if os.path.commonpath([path, root]) != root:
        raise TrioKVError(
            ErrorCode.BAD_REGISTRATION, f"shared-memory file {request.shm_path!r} is not under {root}"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise TrioKVError(
            ErrorCode.BAD_REGISTRATION, f"cannot open {request.shm_path!r}: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)  # of what was opened, not of what the path names now
        if not stat.S_ISREG(info.st_mode):
            raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"{request.shm_path!r} is not a regular file")
        check_file_owner(info, request.shm_path, owner_uid)
        if request.shm_bytes < 1 or request.shm_bytes > info.st_size:
            raise TrioKVError(
                ErrorCode.BAD_REGISTRATION,
                f"declared {request.shm_bytes} bytes but {request.shm_path!r} holds {info.st_size}",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd
