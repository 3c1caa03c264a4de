"""``import hf_efficient`` is light and still registers the attention implementation with transformers."""

import subprocess
import sys

import pytest

CHECK = ("from transformers import AttentionInterface; from transformers.masking_utils import AttentionMaskInterface; "
         "print('hf_efficient' in AttentionInterface._global_mapping, "
         "'hf_efficient' in AttentionMaskInterface._global_mapping)")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.quick
def test_import_loads_neither_torch_nor_transformers():
    assert _run("import sys, hf_efficient; print(sorted({'torch', 'transformers'} & set(sys.modules)))") == "[]"


def test_registered_whichever_is_imported_first():
    orders = ["import hf_efficient; import transformers", "import transformers; import hf_efficient",
              "import hf_efficient; import transformers.masking_utils"]
    procs = [subprocess.Popen([sys.executable, "-c", f"{first}; {CHECK}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for first in orders]  # side by side: ~15 s each
    for first, proc in zip(orders, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "True True", (first, err[-2000:])
