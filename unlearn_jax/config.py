"""ml-collections config files: loading (`get_config()` in a .py file) and `--config.a.b=value` overrides."""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Sequence

from ml_collections import ConfigDict

from unlearn_jax.errors import UnlearnError


def split_config_arg(path: str | Path) -> tuple[Path, str | None]:
    """`file.py:ARG` (ml_collections' convention: ARG goes to `get_config(ARG)`) -> (file, ARG); a plain path
    -> (path, None). A file whose own name holds a colon is taken whole."""
    text = str(path)
    if Path(text).is_file() or ".py:" not in text:
        return Path(text), None
    head, arg = text.split(".py:", 1)
    return Path(head + ".py"), arg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ConfigDict:
    """Runs `get_config()` of the config file (`get_config(ARG)` for `file.py:ARG`), then applies `a.b=value`
    overrides in order."""
    path, arg = split_config_arg(path)
    if not path.is_file():
        raise UnlearnError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_unlearn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise UnlearnError(f"{path}: the config file fails to run: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise UnlearnError(f"{path}: a config file must define get_config()")
    try:
        cfg = module.get_config() if arg is None else module.get_config(arg)
    except TypeError as e:
        if arg is not None and "positional argument" in str(e):
            raise UnlearnError(f"{path}: get_config() takes no argument; drop ':{arg}'") from None
        raise UnlearnError(f"{path}: get_config() fails: TypeError: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # the config file's own code failed: say where, in one line
        raise UnlearnError(f"{path}: get_config() fails: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def _parse(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def apply_override(cfg: ConfigDict, item: str):
    """`erase.eta=5` (the `--config.` prefix already stripped). The value keeps the field's type."""
    if "=" not in item:
        raise UnlearnError(f"--config.{item}: an override needs a value (--config.{item}=VALUE)")
    dotted, text = item.split("=", 1)
    keys = dotted.split(".")
    node = cfg
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, ConfigDict) or k not in node:
            raise UnlearnError(f"--config.{dotted}: no field {'.'.join(keys[:i + 1])} in the config")
        node = node[k]
    last = keys[-1]
    if not isinstance(node, ConfigDict) or last not in node:
        raise UnlearnError(f"--config.{dotted}: no field {dotted} in the config")
    value = _parse(text)
    current = node[last]
    if isinstance(current, bool) and not isinstance(value, bool):
        if str(value).lower() in ("true", "1", "yes"):
            value = True
        elif str(value).lower() in ("false", "0", "no"):
            value = False
    if isinstance(current, str) and not isinstance(value, str):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)
    try:
        node[last] = value
    except (TypeError, ValueError) as e:
        raise UnlearnError(f"--config.{dotted}={text}: {e}") from None


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    it = iter(range(len(argv)))
    skip = set()
    for i in it:
        if i in skip:
            continue
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body = f"{body}={argv[i + 1]}"
                skip.add(i + 1)
            overrides.append(body)
        else:
            rest.append(a)
    return rest, overrides


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)
