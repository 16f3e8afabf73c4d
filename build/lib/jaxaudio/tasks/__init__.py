"""Tasks: how a model plugs into the one trainer. Looked up by `config.task`."""
import importlib

from jaxaudio.tasks.base import Task

_REGISTRY: dict[str, type[Task]] = {}


def register(name: str):
    def wrap(cls: type[Task]) -> type[Task]:
        _REGISTRY[name] = cls
        return cls
    return wrap


def get_task(name: str) -> type[Task]:
    """The task class called `name` (its module `jaxaudio.tasks.<name>` is imported on demand)."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"jaxaudio.tasks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"jaxaudio.tasks.{name}":
                raise
    if name not in _REGISTRY:
        raise ValueError(f"config.task={name!r}: unknown task; known: {sorted(_REGISTRY) or '(none imported)'}")
    return _REGISTRY[name]
