"""Configs in workdirs: frozen config dataclasses written as JSON and read back.

The helpers live in the library (`jaxsearch.config_files`, which the library's own workdir
readers use); this module re-exports them for the training machinery and the programs.
"""
from jaxsearch.config_files import (config_from_dict, config_to_json, read_config,  # noqa: F401
                                    read_config_dict)
