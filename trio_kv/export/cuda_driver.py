"""Checked calls into ``cuda.bindings.driver`` and IPC handle bytes: what both the server's
copy engine and an engine-side exporter need (imports cuda-python; import it lazily)."""

from __future__ import annotations

import ctypes
from typing import Any

from cuda.bindings import driver

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE
_SUCCESS = driver.CUresult.CUDA_SUCCESS


class CudaError(RuntimeError):
    """A driver call failed; ``result`` is its CUresult."""

    def __init__(self, call: str, result: Any) -> None:
        super().__init__(f"{call} failed: {_result_name(result)}")
        self.result = result


def _result_name(result: Any) -> str:
    try:
        err, name = driver.cuGetErrorName(driver.CUresult(int(result)))
        if err == _SUCCESS:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is a nicety; the number below still identifies the error
        pass
    return f"CUresult {int(result)}"


def call(function: Any, *args: Any) -> Any:
    """Call a ``cuda.bindings.driver`` function; raise CudaError unless it succeeded.

    Returns the function's outputs: None, the single output, or a tuple of them.
    """
    result = function(*args)
    if not isinstance(result, tuple):
        result = (result,)
    if result[0] != _SUCCESS:
        raise CudaError(getattr(function, "__name__", str(function)), result[0])
    outputs = result[1:]
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else outputs


def handle_bytes(handle: Any) -> bytes:
    """The 64 raw bytes of a CUipcMemHandle or CUipcEventHandle."""
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def handle_from_bytes(kind: Any, raw: bytes) -> Any:
    """A CUipcMemHandle or CUipcEventHandle (``kind``) holding ``raw``."""
    if len(raw) != IPC_HANDLE_BYTES:
        raise ValueError(f"an IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    handle = kind()
    ctypes.memmove(handle.getPtr(), raw, IPC_HANDLE_BYTES)
    return handle
