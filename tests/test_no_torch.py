"""Planning must not import torch (or any heavy library): plan stays instant on a base install."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "pandas", "numpy")


def test_plan_imports_nothing_heavy():
    code = (
        "import sys, io, contextlib\n"
        "import qlora_bench\n"
        "from qlora_bench.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['plan', '--model', '70b', '--gpu', '48gb', '--method', 'all'])\n"
        "    main(['plan', '--model', '8b', '--gpu', 'h100', '--json'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
