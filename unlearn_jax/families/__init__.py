"""The registry of model families: which family a folder, a config or a model belongs to.

Families are found as modules of this package that define `FAMILY` (so adding a family is adding
a file), in the `unlearn_jax.families` entry-point group of installed packages, and by
`register(family)` (a test's made-up family, a user's plugin). A folder is recognised by its
`model_index.json` `_class_name` or its transformer's `config.json` `_class_name`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.families.base import EraserSite, Family, SamplerDefaults, TextSide, VideoShape

ORBAX_MARKER = "unlearn_jax_checkpoint.json"  # a transformer converted by tools/convert_weights/diffusers_to_jax.py


class Registry:
    """Families by name; the built-in ones are discovered on first use."""

    def __init__(self):
        self._families: dict[str, Family] = {}
        self._discovered = False

    def _discover(self):
        if self._discovered:
            return
        self._discovered = True
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_") or info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            if isinstance(getattr(module, "FAMILY", None), Family):
                self.register(module.FAMILY)
        from importlib.metadata import entry_points

        for ep in entry_points(group="unlearn_jax.families"):
            fam = ep.load()
            self.register(fam() if isinstance(fam, type) else fam)

    def register(self, family: Family) -> Family:
        if not isinstance(family, Family) or not family.name or not family.transformer_class:
            raise TypeError(f"{family!r}: a family is a `Family` with a name and a transformer_class")
        self._families[family.name] = family
        return family

    def unregister(self, name: str):
        self._families.pop(name, None)

    def all(self) -> list[Family]:
        self._discover()
        return list(self._families.values())

    def supported(self) -> str:
        return ", ".join(f"{f.title or f.name} ({f.transformer_class})" for f in self.all())

    def get(self, name: str) -> Family:
        self._discover()
        if name not in self._families:
            raise UnlearnError(f"model family {name!r} is unknown; the families are: {self.supported()}")
        return self._families[name]

    def by_class(self, class_name: str | None, where, config: dict | None = None) -> Family:
        """The family whose transformer or pipeline class is `class_name` (a config without one: the
        family that recognises its fields)."""
        for f in self.all():
            if class_name == f.transformer_class or class_name in f.pipeline_classes:
                return f
        if class_name is None and config is not None:
            for f in self.all():
                if f.recognises(config):
                    return f
        known = " or ".join(f.transformer_class for f in self.all())
        raise ModelFamilyError(f"{where}: holds a {class_name or 'model without a _class_name'}, not a {known} "
                               f"(the model families read here: {self.supported()})")

    def of_config(self, config) -> Family:
        for f in self.all():
            if f.owns(config):
                return f
        raise UnlearnError(f"{type(config).__name__}: not the transformer config of a known model family "
                           f"({self.supported()})")

    def of_model(self, model) -> Family:
        """The family of a loaded model (or an erased model wrapping one)."""
        return self.of_config(model.config)

    def of_transformer_folder(self, folder: Path) -> Family:
        """The family of a transformer folder (diffusers `config.json`, or our orbax checkpoint)."""
        from unlearn_jax.jsonfiles import read_json_object

        folder = Path(folder)
        if (folder / ORBAX_MARKER).is_file():
            meta = read_json_object(folder / ORBAX_MARKER, "unlearn-jax checkpoint description")
            return self.by_class(meta.get("family"), folder)
        config = read_json_object(folder / "config.json", "transformer config")
        return self.by_class(config.get("_class_name"), folder / "config.json", config)

    def of_folder(self, path) -> Family:
        """The family of a pipeline folder (model_index.json, else transformer/) or a transformer folder."""
        from unlearn_jax.jsonfiles import read_json_object

        path = Path(path)
        if not path.is_dir():
            raise UnlearnError(f"{path}: no such folder")
        index = path / "model_index.json"
        if index.is_file():
            name = read_json_object(index, "pipeline index").get("_class_name")
            for f in self.all():
                if name in f.pipeline_classes:
                    return f
            if not (path / "transformer").is_dir():
                return self.by_class(name, index)
        if (path / "transformer").is_dir():
            return self.of_transformer_folder(path / "transformer")
        if (path / "config.json").is_file() or (path / ORBAX_MARKER).is_file():
            return self.of_transformer_folder(path)
        raise UnlearnError(f"{path}: neither a diffusers pipeline folder (model_index.json, transformer/) nor a "
                           "transformer folder (config.json)")


REGISTRY = Registry()
register = REGISTRY.register
unregister = REGISTRY.unregister
get = REGISTRY.get
all_families = REGISTRY.all
of_folder = REGISTRY.of_folder
of_transformer_folder = REGISTRY.of_transformer_folder
of_model = REGISTRY.of_model
of_config = REGISTRY.of_config

__all__ = ["EraserSite", "Family", "ORBAX_MARKER", "REGISTRY", "Registry", "SamplerDefaults", "TextSide",
           "VideoShape", "all_families", "get", "of_config", "of_folder", "of_model", "of_transformer_folder",
           "register", "unregister"]
