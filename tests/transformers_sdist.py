"""Transformers' own common model tests, taken from the source distribution of the installed release.

`pip download transformers==<installed version> --no-binary :all:` fetches the sdist once; its
`tests` folder is unpacked into `$SAR_HF_CACHE/transformers-sdist/<version>/tests`
(default `~/.cache/sar_hf`), where the next run finds them. They are imported as the package
`transformers_sdist_tests`, so that their relative imports resolve among themselves.

The sdist carries `tests/test_modeling_common.py` and `tests/test_configuration_common.py` but not
the helper packages they import (`tests/exporters`, `tests/generation`, `tests/utils`). For each
one that is missing, a small stand-in of ours (`_STAND_INS`) takes its place; a release that ships
the real module gets the real one.
"""

import importlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import types

import transformers

CACHE = pathlib.Path(os.environ.get("SAR_HF_CACHE", pathlib.Path.home() / ".cache" / "sar_hf")) / "transformers-sdist"
PACKAGE = "transformers_sdist_tests"


class SdistUnavailable(RuntimeError):
    """The sdist could not be downloaded (e.g. no registry); the conformance tests skip with this reason."""


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py`: its `torch.export` tests do not run. The SAR
    model's export (with labels, which those tests do not cover) is tested in test_conformance.py."""


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py`: `ModelTesterMixin` only asks whether a tester
    subclasses it, to tell generative models apart; a ViT does not generate."""


# Stand-in for `tests/utils/test_configuration_utils.py`: `ConfigTester.check_config_arguments_init`
# builds a config from these and checks that each was set. Ours: settings that every config takes,
# at values other than their defaults.
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "id2label": {0: "cat", 1: "dog"},
    "problem_type": "single_label_classification",
    "architectures": ["AnImageClassifier"],
}

_STAND_INS = {
    "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
    "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
    "utils.test_configuration_utils": {"config_common_kwargs": config_common_kwargs},
}


def sdist_tests_folder(version: str = transformers.__version__) -> pathlib.Path:
    """The sdist's `tests` folder for `version`, downloaded and unpacked on the first call."""
    folder = CACHE / version / "tests"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:"]
        command += ["--no-deps", "--retries", "1", "--timeout", "30", "--dest", scratch]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise SdistUnavailable(f"`{' '.join(command)}` took more than 10 minutes") from None
        archives = list(pathlib.Path(scratch).glob("transformers-*.tar.gz"))
        if done.returncode or not archives:
            raise SdistUnavailable(f"`pip download` of the transformers {version} sdist failed: {done.stderr[-500:]}")
        unpacked = pathlib.Path(scratch, "tests")
        unpacked.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():  # `transformers-<version>/tests/...`
                parts = pathlib.PurePosixPath(member.name).parts
                if member.isfile() and len(parts) > 2 and parts[1] == "tests":
                    member.name = str(pathlib.PurePosixPath(*parts[2:]))
                    archive.extract(member, unpacked, filter="data")
        # The repository's `tests/__init__.py` is empty, and the sdist leaves it out; the
        # configuration tests read it (`direct_transformers_import(Path(__file__).parent)`).
        unpacked.joinpath("__init__.py").touch()
        os.replace(unpacked, folder)  # whole or not at all, should a run be killed meanwhile
    return folder


def import_common_tests(version: str = transformers.__version__) -> tuple[types.ModuleType, types.ModuleType]:
    """`(test_modeling_common, test_configuration_common)` of the sdist of `version`."""
    folder = sdist_tests_folder(version)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
        for name, attributes in _STAND_INS.items():
            if not folder.joinpath(*name.split(".")).with_suffix(".py").is_file():
                _install_stand_in(f"{PACKAGE}.{name}", attributes)
    names = ("test_modeling_common", "test_configuration_common")
    return tuple(importlib.import_module(f"{PACKAGE}.{name}") for name in names)


def _install_stand_in(name: str, attributes: dict):
    """Registers module `name` (and its parent packages) with `attributes` in `sys.modules`."""
    parent, _, leaf = name.rpartition(".")
    if parent not in sys.modules:
        _install_stand_in(parent, {})
        sys.modules[parent].__path__ = []
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    setattr(sys.modules[parent], leaf, module)


__all__ = ["CACHE", "SdistUnavailable", "import_common_tests", "sdist_tests_folder"]
