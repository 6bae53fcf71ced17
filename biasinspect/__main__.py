"""``python -m biasinspect``."""

from __future__ import annotations

from biasinspect.cli import console_main

if __name__ == "__main__":
    console_main()
