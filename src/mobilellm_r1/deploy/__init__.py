"""On-device deployment (paper section 8): 8da4w quantization, ExecuTorch/GGUF export, decode benchmark."""

from .config import DeployConfig

__all__ = ["DeployConfig"]
