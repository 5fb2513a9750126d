"""``ddpo.rewards`` in a clone: the repository's top-level ``rewards/`` folder, under the name an installed copy uses.

A wheel installs ``rewards/`` as ``ddpo/rewards`` (setup.py maps it), so that it never overwrites PyPI's
own ``rewards`` package (0.1.1) or any other top-level ``rewards``. In a clone the folder stays where the
project's layout puts it, and this finder makes ``import ddpo.rewards.<module>`` return the very module
``import rewards.<module>`` returns: one module object under both names, so a config's
``_target_: ddpo.rewards.jpeg.JpegCompressibility``, the project's code and a user's
``from rewards.jpeg import ...`` all see the same classes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

PREFIX = "ddpo.rewards"


class RewardsAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, name, path=None, target=None):
        if name != PREFIX and not name.startswith(PREFIX + "."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=name == PREFIX)

    def _top_level(self):
        """The clone's ``rewards`` package (loaded from its folder if another ``rewards`` comes first on the path)."""
        module = sys.modules.get("rewards")
        init = os.path.join(self.folder, "__init__.py")
        if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == init:
            return module
        spec = importlib.util.find_spec("rewards") if module is None else None
        if spec is not None and spec.origin and os.path.abspath(spec.origin) == init:
            return importlib.import_module("rewards")
        if module is not None:  # another package named rewards is imported: ours cannot take its name
            raise ImportError(f"ddpo.rewards needs {self.folder} as 'rewards', but {module.__file__} holds that name")
        spec = importlib.util.spec_from_file_location("rewards", init, submodule_search_locations=[self.folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rewards"] = module
        spec.loader.exec_module(module)
        return module

    def create_module(self, spec):
        self._top_level()
        real = "rewards" + spec.name[len(PREFIX) :]
        module = importlib.import_module(real)
        self._specs[real] = module.__spec__  # import machinery will set the alias spec: restored in exec_module
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)


def install(folder: str) -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, RewardsAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, RewardsAlias(folder))
