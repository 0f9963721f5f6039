"""Numbers as people read them."""


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB'; binary units, one decimal past bytes."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
