"""Guards on the house: every public name stays importable, every config composes and its targets resolve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

import astroprep_torch as ap

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("module", ap._SUBMODULES)
def test_public_names_importable(module):
    mod = importlib.import_module(f"astroprep_torch.{module}")
    missing = [name for name in getattr(mod, "__all__", []) if not hasattr(mod, name)]
    assert not missing, f"astroprep_torch.{module}.__all__ names missing attributes: {missing}"


def _targets(node, where=""):
    if isinstance(node, DictConfig):
        for key in node.keys():
            value = node._get_node(key)._value() if node._get_node(key) is not None else None
            if key == "_target_" and isinstance(value, str):
                yield where, value
            else:
                yield from _targets(node._get_node(key), f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _targets(node._get_node(i), f"{where}[{i}]")


def _yaml_files():
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("relpath", _yaml_files())
def test_every_config_target_resolves(relpath):
    from hydra._internal.utils import _locate

    cfg = OmegaConf.load(CONFIGS / relpath)
    for where, target in _targets(cfg):
        try:
            _locate(target)
        except Exception as exc:  # noqa: BLE001 - report which config and key is dead
            pytest.fail(f"configs/{relpath}{where}: _target_ {target!r} does not resolve ({exc})")


#: Group options that no primary config selects yet (issue #23: wire them in or remove them). This list
#: may only shrink: a new option must be selectable from a primary config.
KNOWN_ORPHANS = {"align/default", "align/stars", "align/wcs", "cutouts/default", "photometry/default"}


def _primary_configs():
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def _group_options():
    return sorted((p.parent.relative_to(CONFIGS).as_posix(), p.stem)
                  for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS)


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield hydra_compose


@pytest.mark.parametrize("name", _primary_configs())
def test_every_primary_config_composes(compose, name):
    cfg = compose(config_name=name, return_hydra_config=True)
    OmegaConf.to_container(cfg, resolve=False)


def _defaults_groups(name: str) -> dict[str, str]:
    """Group -> the key that overrides it (``group`` or ``group@package``) in a primary config."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    groups = {}
    for entry in cfg.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)):
            for key in entry:
                key = str(key).replace("override ", "").strip()
                groups[key.split("@")[0]] = key
    return groups


def test_every_group_option_composes_in_a_primary_config(compose):
    """Each ``configs/<group>/<option>.yaml`` composes inside a primary config that uses the group."""
    users = {name: _defaults_groups(name) for name in _primary_configs()}
    orphans, failures = [], []
    for group, option in _group_options():
        primaries = [name for name, groups in users.items() if group in groups]
        if not primaries:
            orphans.append(f"{group}/{option}")
            continue
        try:
            key = users[primaries[0]][group]
            compose(config_name=primaries[0], overrides=[f"{key}={option}"], return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 - collect every failure
            failures.append(f"{group}/{option} in {primaries[0]}: {exc}")
    assert not failures, "\n".join(failures)
    new = sorted(set(orphans) - KNOWN_ORPHANS)
    assert not new, f"config options that no primary config can select: {new}"


def test_package_passes_ruff_with_the_complexity_cap():
    """pyflakes and the McCabe cap of pyproject.toml's [tool.ruff] over the package (the cap only goes down)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff (dev extra) is not installed")
    root = CONFIGS.parent
    proc = subprocess.run([ruff, "check", "--no-cache", "astroprep_torch"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
