"""mada-fused: MADA, AdaMod, AVGrad and DiffMod as drop-in torch.optim optimizers,
with fused CPU, CUDA and Triton backends and a pure-PyTorch reference."""
from .adamod import AdaMod, DiffMod
from .build_info import build_info
from .grad_release import GradRelease, grad_release
from .mada import AVGrad, MADA

__version__ = "0.1.0"
__all__ = ["MADA", "AdaMod", "AVGrad", "DiffMod", "GradRelease", "build_info", "grad_release", "__version__"]
