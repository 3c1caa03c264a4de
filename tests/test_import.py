"""``import hf_efficient`` is light and still registers the attention implementation with transformers."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.quick

CHECK = ("from transformers import AttentionInterface; from transformers.masking_utils import AttentionMaskInterface; "
         "print('hf_efficient' in AttentionInterface._global_mapping, "
         "'hf_efficient' in AttentionMaskInterface._global_mapping)")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_loads_neither_torch_nor_transformers():
    assert _run("import sys, hf_efficient; print(sorted({'torch', 'transformers'} & set(sys.modules)))") == "[]"


@pytest.mark.parametrize("first", ["import hf_efficient; import transformers", "import transformers; import hf_efficient",
                                   "import hf_efficient; import transformers.masking_utils"])
def test_registered_whichever_is_imported_first(first):
    assert _run(f"{first}; {CHECK}") == "True True"
