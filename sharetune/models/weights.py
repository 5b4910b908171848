"""State dicts from files, loaded without running code.

`torch.load` unpickles, and a pickle can run any code it names; `weights_only=True` restricts it to
tensors and plain containers. Pretrained weights come from users and search folders, so they load
only this way, and what loads must be a mapping of names to tensors.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import torch
from torch import Tensor


class WeightsError(ValueError):
    """A weights file that is not a state dict (or would run code to become one)."""


def load_plain(source: str | Path | IO[bytes]):
    """`torch.load` of tensors and plain values only, on the CPU, quiet: a pickle torch did not write
    (another protocol) made its unpickler warn before it refused the file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return torch.load(source, map_location="cpu", weights_only=True)


def _why_refused(err: Exception) -> str:
    """Torch's reason (the object it refused, or the bytes it could not read) without its advice, which
    is to load the file with `weights_only=False` or to allowlist the object: to run the code it names."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(err).splitlines()]
    reasons = [line for line in lines if line and "weights_only" not in line and not line.startswith("Weights only load failed")]
    return reasons[0].split(" Please use ")[0] if reasons else type(err).__name__


def load_state_dict(source: str | Path | bytes) -> dict[str, Tensor]:
    """The state dict in a file (or its bytes), on the CPU; WeightsError if it is anything else."""
    name = "weights" if isinstance(source, bytes) else str(source)
    try:
        state = load_plain(io.BytesIO(source) if isinstance(source, bytes) else source)
    except OSError as err:
        raise WeightsError(f"{name}: cannot read it ({err.strerror or err})") from None
    except Exception as err:  # whatever torch's unpickler makes of bytes that are not its format
        raise WeightsError(f"{name}: not a state dict torch loads without running code ({_why_refused(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(f"{name}: not a state dict (a mapping of parameter names to tensors); got a {type(state).__name__}")
    return state
