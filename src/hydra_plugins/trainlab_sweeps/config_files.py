"""Config files parsed once per process, through two of Hydra's extension points.

Hydra reads and parses each YAML file anew for every composition, and a run composes its config
three times before it trains (the command line's check, Hydra's choice of mode, Hydra's run);
a sweep's launcher composes each job once more, Hydra's sweeper once more, and the fork server's
jobs could share what the server read. Parsing is about a quarter of a composition's time.
Hydra has no option to keep what it parsed, so `ParsedOnce` is Hydra's own file source with the
parsed file kept, keyed by its path, size and modification time (an edited file is read again),
and a copy handed out each time (Hydra merges into what it is given); `PackagedOnce` is the same
for configs inside installed packages (Hydra's own); `ReadConfigFilesOnce` points the search
path's entries at them. Hydra finds all three in the hydra_plugins namespace, as it finds the
launcher.
"""

from __future__ import annotations

import copy
import os

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra._internal.core_plugins.importlib_resources_config_source import (
    ImportlibResourcesConfigSource,
)
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.config_source import ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

_parsed: dict[tuple, ConfigResult] = {}


def _copy(kept: ConfigResult) -> ConfigResult:
    return ConfigResult(
        provider=kept.provider,
        path=kept.path,
        config=copy.deepcopy(kept.config),
        header=dict(kept.header),
        is_schema_source=kept.is_schema_source,
    )


class ParsedOnce(FileConfigSource):
    """A directory of config files, as Hydra's file source reads it, each parsed once."""

    @staticmethod
    def scheme() -> str:
        return "trainlab-file"

    def load_config(self, config_path: str) -> ConfigResult:
        path = os.path.realpath(os.path.join(self.path, self._normalize_file_name(config_path)))
        try:
            stat = os.stat(path)
        except OSError:
            return super().load_config(config_path)  # Hydra's own error for a missing file
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _parsed:
            _parsed[key] = super().load_config(config_path)
        return _copy(_parsed[key])


class PackagedOnce(ImportlibResourcesConfigSource):
    """Configs inside an installed package (Hydra's own), as Hydra reads them, each parsed once:
    installed files do not change while a process runs."""

    @staticmethod
    def scheme() -> str:
        return "trainlab-pkg"

    def load_config(self, config_path: str) -> ConfigResult:
        key = ("pkg", self.path, config_path)
        if key not in _parsed:
            _parsed[key] = super().load_config(config_path)
        return _copy(_parsed[key])


class ReadConfigFilesOnce(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            if element.path.startswith("file://"):
                element.path = ParsedOnce.scheme() + element.path.removeprefix("file")
            elif element.path.startswith("pkg://"):
                element.path = PackagedOnce.scheme() + element.path.removeprefix("pkg")
            elif "://" not in element.path:  # a plain directory is a file:// one
                element.path = f"{ParsedOnce.scheme()}://{element.path}"
