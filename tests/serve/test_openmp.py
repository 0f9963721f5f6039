"""Serving processes start with Intel's OpenMP runtime preloaded where it is installed."""

import sys
from pathlib import Path

import pytest

from llm.serve.openmp import INTEL_OPENMP, serving_environment

installed = (Path(sys.prefix) / "lib" / INTEL_OPENMP).is_file()


@pytest.mark.skipif(not installed, reason="intel-openmp is installed only on Linux x86_64")
def test_it_preloads_intel_openmp_before_what_was_preloaded_already():
    library = str(Path(sys.prefix) / "lib" / INTEL_OPENMP)
    assert serving_environment({}) == {"LD_PRELOAD": library}
    assert serving_environment({"LD_PRELOAD": "/x/libother.so"}) == {"LD_PRELOAD": f"{library}:/x/libother.so"}
    assert serving_environment({"LD_PRELOAD": library}) == {}


def test_ft_openmp_gnu_keeps_torchs_own_runtime():
    assert serving_environment({"FT_OPENMP": "gnu"}) == {}
