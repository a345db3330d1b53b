"""Make ``python -m pytest`` in this checkout test the installed fastbn.

``python -m`` puts the current directory first on sys.path, so ``import fastbn`` would find
this source tree, whose fastbn/ has no compiled extension after a plain ``pip install .``.
When the tree holds no built extension, it is taken off sys.path; an editable install
(``pip install -e .``) or an in-place build keeps working as before.
"""

import glob
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))

if not glob.glob(os.path.join(_ROOT, "fastbn", "_core*.so")) and not glob.glob(
    os.path.join(_ROOT, "fastbn", "_core*.pyd")
):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
