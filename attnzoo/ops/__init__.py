"""Numerical ops. Each op family has a reference form (the spec) and fast forms."""

from attnzoo.ops.attention import attention

__all__ = ["attention"]
