"""Device-check preflight: versions, driver, device, and the cuda-bindings features trio-kv uses.

--features-only: exit 0 iff the importable cuda-bindings has every API trio-kv calls (no driver needed).
Otherwise exit 0 iff trio-kv's CUDA backend can start (driver_status() is None and CudaTransfer() builds);
exit 3, saying so, on a host without a usable GPU. Imports trio_kv from the working tree (PYTHONPATH).
"""

from __future__ import annotations

import ctypes
import platform
import re
import sys
import time
from pathlib import Path

TRIO_KV = Path(__file__).resolve().parent.parent / "trio_kv"


def driver_names_used(root: Path = TRIO_KV) -> set[str]:
    """Every ``driver.<name>`` the trio_kv sources under ``root`` use."""
    return {name for path in root.rglob("*.py") for name in re.findall(r"\bdriver\.(\w+)", path.read_text())}


def features() -> list[str]:
    """What trio-kv needs from cuda-bindings and is missing."""
    missing = []
    try:
        import cuda.bindings
        from cuda.bindings import driver
    except Exception as exc:
        return [f"import cuda.bindings: {exc}"]
    print(f"cuda-bindings {getattr(cuda.bindings, '__version__', '?')} at {cuda.bindings.__file__}")
    for name in sorted(driver_names_used() | {"cuStreamWaitValue32"}):  # the GPU tests gate streams
        if not hasattr(driver, name):
            missing.append(f"driver.{name}")
    try:
        h = driver.CUipcMemHandle()
        ctypes.string_at(h.getPtr(), 64)
    except Exception as exc:
        missing.append(f"CUipcMemHandle.getPtr: {exc}")
    try:
        if not isinstance(driver.CUuuid().bytes, bytes):
            missing.append("CUuuid.bytes is not bytes")
    except Exception as exc:
        missing.append(f"CUuuid.bytes: {exc}")
    try:
        a = driver.CUmemcpyAttributes()
        a.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        if ctypes.c_int.from_address(a.getPtr()).value != 1:
            missing.append("CUmemcpyAttributes layout: srcAccessOrder is not the first int")
    except Exception as exc:
        missing.append(f"CUmemcpyAttributes: {exc}")
    return missing


def main() -> int:
    t0 = time.perf_counter()
    print(f"python {platform.python_version()} {sys.executable}")
    missing = features()
    if "--features-only" in sys.argv:
        print("missing:", missing or "nothing")
        return 1 if missing else 0
    if missing:
        print("PREFLIGHT: cuda-bindings lacks", missing)
    try:
        import torch

        print(f"torch {torch.__version__} cuda={torch.version.cuda} available={torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(
                f"torch device 0: {p.name} {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} devices"
            )
            import os

            for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
                print(name, "=", os.environ.get(name, "(unset)"))
    except Exception as exc:
        print(f"torch: {exc}")
    from cuda.bindings import driver

    from trio_kv.export.cuda_driver import call
    from trio_kv.transfer.events import driver_status

    reason = driver_status()
    print("trio_kv driver_status():", reason or "OK")
    if reason is not None:
        print(f"PREFLIGHT: no GPU usable by trio-kv here ({reason}); nothing to check")
        return 3

    def info(label, fn):
        try:
            print(label, fn())
        except Exception as exc:
            print(label, f"unavailable: {type(exc).__name__}: {exc}")

    version = call(driver.cuDriverGetVersion)
    print(f"driver CUDA version {version // 1000}.{version % 1000 // 10}")
    dev = call(driver.cuDeviceGet, 0)
    info("device 0:", lambda: call(driver.cuDeviceGetName, 64, dev).split(b"\0")[0].decode(errors="replace"))
    A = driver.CUdevice_attribute
    for attr in (
        "CU_DEVICE_ATTRIBUTE_IPC_EVENT_SUPPORTED",
        "CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING",
        "CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM",
        "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_WAIT_VALUE_NOR",
        "CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES",
        "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
    ):
        if hasattr(A, attr):
            info(
                f"  {attr[len('CU_DEVICE_ATTRIBUTE_') :]} =",
                lambda a=attr: call(driver.cuDeviceGetAttribute, getattr(A, a), dev),
            )
    from trio_kv.transfer.cuda import CudaTransfer

    transfer = CudaTransfer()  # resolves the batch entry point (Copier) as the server does
    print("CudaTransfer: devices", [(d.ordinal, d.uuid.hex()) for d in transfer.devices])
    print("CudaTransfer copies:", transfer.copier.describe())
    transfer.devices[0].activate()
    batch = transfer.copier.batch  # None: the driver gave no cuMemcpyBatchAsync (per-piece copies)
    print(
        "cuMemcpyBatchAsync (12.8 ABI) at",
        hex(ctypes.cast(batch, ctypes.c_void_p).value or 0) if batch else None,
    )
    # The bindings' own (CUDA 13 ABI) entry point, for the record
    try:
        ptr, status = call(driver.cuGetProcAddress, b"cuMemcpyBatchAsync", 13000, 0)
        print("cuMemcpyBatchAsync (13.0 ABI):", hex(int(ptr)), status)
    except Exception as exc:
        print("cuMemcpyBatchAsync (13.0 ABI):", exc)
    info("device memory free/total GiB:", lambda: [round(x / 2**30, 1) for x in call(driver.cuMemGetInfo)])
    print(f"PREFLIGHT OK in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
