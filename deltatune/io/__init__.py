"""PEFT-format persistence: see deltatune.io.peft_format."""

from deltatune.io.peft_format import (
    CONFIG_NAME,
    SIDECAR_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    read_adapter,
    write_adapter,
)

__all__ = ["CONFIG_NAME", "SIDECAR_NAME", "WEIGHTS_NAME", "AdapterFileError", "read_adapter", "write_adapter"]
