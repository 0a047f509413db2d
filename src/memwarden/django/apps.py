"""The app Django finds for ``"memwarden.django"``."""

from memwarden.integrations.django import MemwardenConfig

__all__ = ["MemwardenConfig"]
