"""Flash attention in Triton (see op.py)."""
from .op import *  # noqa: F401,F403
from .op import flash_attention, static_launches  # noqa: F401
