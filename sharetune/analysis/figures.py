"""How every sharetune plot is written: laid out, saved as PNG, closed."""

from __future__ import annotations

from pathlib import Path

DPI = 120


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` to `path` and close it (a report draws many figures; open ones keep their memory)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
