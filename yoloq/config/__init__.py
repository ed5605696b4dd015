"""YAML configs -> validated dataclasses.

One experiment config (``configs/*.yaml``) has the sections ``model``, ``data``, ``eval``,
``quant``, ``qat``, ``export``, ``train``, ``loss`` and ``augment``; every section is a small
dataclass that checks itself when it is made (``__post_init__``): a ``Literal`` annotation lists the
allowed values, the numeric rules sit next to the fields. Unknown keys are an error that names the
key and the closest valid one, so a typo never silently falls back to a default. Relative paths are
resolved against the directory of the YAML file that holds them. Command-line flags change a config
only through ``Config.with_overrides``, which validates again.

Modules: ``base`` (allowed values, the ``Section`` base, ``from_dict``), ``sections`` (the
sections and ``Config``), ``quant`` (the nested ``quant`` section), ``load`` (``load_config`` /
``apply_settings``), ``yaml_text`` (bounded YAML), ``lookup`` (shipped configs by name,
``${YOLOQ_SHARED}``), ``upstream`` (upstream ``.py`` configs, read with ``ast``). Dataset YAMLs are
read by ``yoloq.data.load_data_config``.
"""
from yoloq.config import base
from yoloq.config.base import *  # noqa: F401,F403 - the allowed values (Literal aliases) and helpers
from yoloq.config.load import apply_settings, load_config, resolve_path
from yoloq.config.sections import (AugmentConfig, Config, DataConfig, EvalConfig, ExportConfig, LossConfig,
                                   ModelConfig, QATConfig, QuantConfig, TrainConfig)

__all__ = base.__all__ + ["apply_settings", "AugmentConfig", "Config", "DataConfig", "EvalConfig", "ExportConfig", "LossConfig",
                         "ModelConfig", "QATConfig", "QuantConfig", "TrainConfig", "load_config", "resolve_path"]
