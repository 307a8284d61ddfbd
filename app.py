"""Launcher of pimg's web demo from a source checkout: `python app.py [--base ...]`.

The demo itself is `pimg.frontends.app` (installed with the package; `pimg app` starts it too).
"""

from pimg.frontends.app import build_demo, main, serve

__all__ = ["build_demo", "main", "serve"]

if __name__ == "__main__":
    main()
