"""How much memory a device has free (for budgets such as the expert cache's)."""

from __future__ import annotations

import os

import torch


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of ``device``: CUDA's free device memory, else the host's available memory (MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30  # unknown: assume 4 GiB
