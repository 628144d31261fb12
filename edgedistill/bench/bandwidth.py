"""The machine's memory read bandwidth, the ceiling of batch-1 decoding: each decoded token reads
(nearly) every weight once, so a model of B bytes decodes at most bandwidth / B tokens per second.

    python -m edgedistill.bench.bandwidth                   # CPU: numpy, all cores
    python -m edgedistill.bench.bandwidth --device cuda     # the GPU's memory, with torch

CPU: a numpy sum over an int64 buffer well beyond the last-level cache (twice its size, at least
256 MiB), split over `threads` threads (numpy releases the GIL in reductions); the buffer is
written first, since untouched pages all map to one zero page and would be read from cache. CUDA:
a torch sum over a 1 GiB tensor, timed with CUDA events. Both report the median of a few passes in
GB/s (1e9 bytes), and a line saying how they measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIB = 1 << 20
MIN_BUFFER_BYTES = 256 * MIB
# The buffer is transient but real memory: never more than this, nor a quarter of what is free.
MAX_BUFFER_BYTES = 2048 * MIB
CUDA_BUFFER_BYTES = 1024 * MIB


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports for cpu0 (its last level), or None where it says nothing."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else None


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def buffer_bytes() -> int:
    llc = last_level_cache_bytes() or 0
    size = max(MIN_BUFFER_BYTES, 2 * llc)
    available = _available_bytes()
    cap = min(MAX_BUFFER_BYTES, available // 4) if available else MAX_BUFFER_BYTES
    return max(MIB, min(size, cap))


def cpu_bandwidth(*, threads: int | None = None, size_bytes: int | None = None, passes: int = 5) -> dict:
    """{"bandwidth_gb_s", "bandwidth_method"} of the CPU's memory, read by numpy."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    size_bytes = size_bytes or buffer_bytes()
    data = np.full(size_bytes // 8, 1, dtype=np.int64)
    chunks = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, chunks))  # warm-up: threads started, pages in the TLB once
        for _ in range(passes):
            started = time.perf_counter()
            list(pool.map(np.sum, chunks))
            rates.append(data.nbytes / (time.perf_counter() - started) / 1e9)
    llc = last_level_cache_bytes()
    llc_text = f"last-level cache {llc // MIB} MiB" if llc else "last-level cache size unknown"
    return {"bandwidth_gb_s": round(statistics.median(rates), 2),
            "bandwidth_method": f"numpy sum of a {data.nbytes // MIB} MiB int64 buffer ({llc_text}), "
                                f"{threads} threads, median of {passes} passes"}


def cuda_bandwidth(*, size_bytes: int = CUDA_BUFFER_BYTES, passes: int = 10) -> dict:
    """{"bandwidth_gb_s", "bandwidth_method"} of the first GPU's memory, read by a torch sum."""
    import torch

    data = torch.ones(size_bytes // 4, dtype=torch.float32, device="cuda")
    data.sum()  # warm-up: the reduction kernel loaded
    rates = []
    for _ in range(passes):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        data.sum()
        end.record()
        end.synchronize()
        rates.append(data.nbytes / (start.elapsed_time(end) / 1000) / 1e9)
    del data
    torch.cuda.empty_cache()
    return {"bandwidth_gb_s": round(statistics.median(rates), 1),
            "bandwidth_method": f"torch sum of a {size_bytes // MIB} MiB float32 tensor on "
                                f"{torch.cuda.get_device_name(0)}, CUDA events, median of {passes} passes"}


def measure_bandwidth(device: str = "cpu", *, threads: int | None = None) -> dict:
    """The bandwidth of `device` ("cpu" or "cuda"); CUDA in a fresh process, so the caller never
    starts a CUDA context of its own (the bench worker that follows needs the GPU's memory)."""
    if device == "cpu":
        return cpu_bandwidth(threads=threads)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgedistill.bench.bandwidth", "--device", device],
                          capture_output=True, text=True)
    if done.returncode != 0:
        from edgedistill.errors import EdgedistillError
        raise EdgedistillError(f"measuring the {device} memory bandwidth failed: {done.stderr.strip()[-600:]}",
                               "check that torch sees the GPU: python -c 'import torch; print(torch.cuda.is_available())'")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    print(json.dumps(cpu_bandwidth(threads=args.threads) if args.device == "cpu" else cuda_bandwidth()))


if __name__ == "__main__":
    main()
