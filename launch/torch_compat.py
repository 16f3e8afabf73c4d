"""Import timm and transformers where torchvision cannot load.

The PyPI torchvision wheel is built against CUDA torch; next to the CPU-only
torch==2.13.0 its C extension fails (`operator torchvision::nms does not exist`), and
`import timm` / `import transformers.<model>` / `import peft` fail with it. The pieces
our parity tests use (timm's ViT `Block`, transformers' text and audio models) never
touch torchvision, so when the real one cannot load we register an inert stand-in
package for it (`conftest.py` does this once per test session).
"""
import enum
import importlib.abc
import importlib.machinery
import sys
import types


class _Inert(types.ModuleType):
    """A module whose every attribute is a harmless placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Inert(spec.name)
        module.__path__ = []
        module.InterpolationMode = InterpolationMode
        return module

    def exec_module(self, module):
        pass


def ensure_torchvision_importable() -> None:
    """Leave a working torchvision alone; otherwise route `import torchvision` to the stand-in."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return  # not installed: the libraries run without it
    except (RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _Finder())


def import_timm():
    """`timm`, imported through the stand-in torchvision if the real one fails."""
    ensure_torchvision_importable()
    import timm
    return timm
