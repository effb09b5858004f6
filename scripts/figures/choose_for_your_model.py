"""Figure of the "Choose a method for your model" tutorial: docs/figures/choose-for-your-model.png.

Runs the tutorial's own code blocks (the seeded tiny encoder, the capture and the
question, on the NumPy backend) in a temporary folder and copies the plot that
``eff-attn compare --target`` wrote. Errors are seeded; the times are those of the
run, so they change from machine to machine.

    python scripts/figures/choose_for_your_model.py
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "tutorials" / "choose-for-your-model.md"
OUT = ROOT / "docs" / "figures" / "choose-for-your-model.png"


def main():
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    asking = next(i for i, block in enumerate(blocks) if "cli.main" in block)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            namespace = {"__name__": "__tutorial__"}
            for block in blocks[: asking + 1]:
                exec(compile(block, PAGE.name, "exec"), namespace)
            shutil.copyfile(Path(tmp) / "my-answer" / "recommendation.png", OUT)
        finally:
            os.chdir(here)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
