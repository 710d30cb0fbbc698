"""Immutable value objects with named fields, for the types `tether run` defines on every start.

`class Section(Value)` with annotated fields and defaults gives what `typing.NamedTuple` gave them:
positional or keyword construction, defaults, a TypeError naming a missing or unknown field,
immutability, equality and hashing by value, `repr`, `_fields`, `_field_defaults`, `_asdict()`
and `_replace()`. What it does not give is the tuple: a value neither unpacks nor indexes.

Why not NamedTuple or a frozen dataclass: both do their work when the class is *defined*.
NamedTuple generates and compiles source for each class's `__new__` and type-checks every
annotation (~0.2 ms a class); `dataclasses` imports `inspect` (and with it `ast`, `dis`,
`tokenize`) and compiles an `__init__` per class. `tether run` defined some thirty of them before
its first packet (issue 24); a `Value` subclass costs what a plain class costs (~0.03 ms).

mypy reads the fields like a frozen dataclass's (PEP 681 `dataclass_transform`).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar, dataclass_transform

V = TypeVar("V", bound="Value")


@dataclass_transform(eq_default=True, frozen_default=True)
class Value:
    """Base of a value type: subclass it, annotate the fields (in order), give defaults where wanted."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _field_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # this class's own annotations (not inspect.get_annotations: `inspect` is what this module avoids)
        notes = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        own = [name for name, note in notes.items()
               if not str(note).startswith(("ClassVar", "typing.ClassVar"))]
        cls._fields = cls._fields + tuple(n for n in own if n not in cls._fields)
        defaults = dict(cls._field_defaults)
        for name in own:
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
            elif defaults:  # as in a function signature: no required field after one with a default
                raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with a default")
        cls._field_defaults = defaults

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        name = type(self).__name__
        if len(args) > len(fields):
            raise TypeError(f"{name}() takes {len(fields)} fields, got {len(args)}")
        values = dict(zip(fields, args, strict=False))
        for key, value in kwargs.items():
            if key not in fields:
                raise TypeError(f"{name}() has no field {key!r}; its fields are {', '.join(fields)}")
            if key in values:
                raise TypeError(f"{name}() got field {key!r} twice")
            values[key] = value
        if len(values) < len(fields):
            for field in fields:
                if field not in values:
                    if field not in self._field_defaults:
                        raise TypeError(f"{name}() is missing field {field!r}")
                    values[field] = self._field_defaults[field]
        object.__setattr__(self, "__dict__", {f: values[f] for f in fields})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r} (use _replace)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *self.__dict__.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def _asdict(self) -> dict[str, Any]:
        """The fields by name, in order (a new dict)."""
        return dict(self.__dict__)

    def _replace(self: V, **changes: Any) -> V:
        """A copy with `changes`; TypeError for a name that is not a field."""
        return type(self)(**{**self.__dict__, **changes})
