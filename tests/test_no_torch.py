"""The runtime never needs torch: import and generate with torch made unimportable."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from specrt.runtime import Engine
e = Engine.load(sys.argv[1])
r = e.generate([5, 17, 33], max_new_tokens=8, k=4)
assert len(r.token_ids) >= 1
assert "transformers" not in sys.modules and "optimum" not in sys.modules
print("ok")
"""


def test_runtime_without_torch(engines):
    p = subprocess.run([sys.executable, "-c", CODE, str(engines["close"])], capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
