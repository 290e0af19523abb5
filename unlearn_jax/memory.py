"""Whether a compiled program fits in the memory that is free, checked before it runs.

XLA knows, once it has compiled a program, how much scratch memory it will take; a run that cannot
fit is refused with one line naming the figures instead of failing deep inside the runtime (or
swapping the host to a halt).
"""
from __future__ import annotations

from unlearn_jax.errors import UnlearnError

GIB = 2**30


def available_bytes(device=None) -> int | None:
    """Free memory of `device` (default: the first): an accelerator's allocator limit minus what is in
    use, the host's MemAvailable for the CPU; None when it cannot be told."""
    import jax

    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def needed_bytes(compiled) -> int | None:
    """New memory a compiled program takes when it runs: its temporaries and outputs (its inputs exist already)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes) + int(m.output_size_in_bytes) - int(getattr(m, "alias_size_in_bytes", 0) or 0)


def check_fits(compiled, what: str, hint: str, device=None) -> None:
    """Refuses (one line) to run `compiled` when it needs more memory than is free."""
    need, free = needed_bytes(compiled), available_bytes(device)
    if need is None or free is None or need <= free:
        return
    raise UnlearnError(f"{what} needs about {need / GIB:.1f} GiB of working memory and {free / GIB:.1f} GiB are "
                       f"free; {hint}")
