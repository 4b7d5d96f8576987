"""Drop-ins for the parts of ``opensora.datasets`` that ``opensora.utils`` uses."""

from .aspect import get_image_size
from .utils import save_sample

__all__ = ["get_image_size", "save_sample"]
