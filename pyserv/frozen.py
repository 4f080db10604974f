"""Immutable settings objects without dataclasses.

A CGI process pays, on every request, for importing ``dataclasses`` (which imports
``inspect``) and for generating each class's methods; settings built once per request do
not need that machinery.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CGI start-up)
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    """Write-once attributes in ``__slots__``, compared and shown by value: a frozen
    dataclass without its price, which a CGI process pays on every request (importing
    dataclasses, then generating each class's methods). ``__init__`` sets every slot."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self.__slots__ or hasattr(self, name):
            raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def as_dict(self) -> dict[str, Any]:
        """The attributes as a dict, nested ones too (as ``dataclasses.asdict``)."""
        return {
            name: value.as_dict() if isinstance(value, Frozen) else value
            for name, value in zip(self.__slots__, self._values())
        }
