"""lowbit.passes: one module per pass; importing the package registers them all by name."""
import importlib
import pkgutil

from .registry import ModulePass, PassError, register_pass, registered_passes

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ModulePass", "PassError", "register_pass", "registered_passes"]
