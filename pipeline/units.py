"""How durations are written, in one place: console ETAs, `status`, and `plan`'s estimates."""

from __future__ import annotations


def format_duration(seconds: float | None, style: str = "clock") -> str:
    """``clock``: "3h 01m", "0m 59s", "2d 0h 00m" (status); ``compact``: "3h01m", "0m59s",
    "2d01h" (the training console's ETA); ``approx``: "42.0 s", "1.5 min", "3.0 h", "4.2 days"
    (estimates, where a false precision would mislead)."""
    if seconds is None:
        return "unknown"
    if style == "approx":
        for limit, unit, div in ((120, "s", 1), (7200, "min", 60), (3 * 86400, "h", 3600)):
            if seconds < limit:
                return f"{seconds / div:.1f} {unit}"
        return f"{seconds / 86400:.1f} days"
    total = max(0, int(round(seconds)))
    d, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if style == "compact":
        return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
    if style != "clock":
        raise ValueError(f"style must be clock, compact or approx, got {style!r}")
    return (f"{d}d " if d else "") + (f"{h}h {m:02d}m" if d or h else f"{m}m {s:02d}s")
