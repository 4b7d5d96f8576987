"""Builds the sdist: python tools/sdist.py [OUTDIR] (default dist/).

Through setuptools' PEP 517 hook, in this interpreter (no isolation, no `build`
package needed); setup.py needs torch importable. The sdist carries the plain version
(0.1.0): whoever builds it gets the local tag of their own torch and CUDA
(pip install --no-build-isolation opensora_fast-0.1.0.tar.gz -> 0.1.0+cu130torch2.14).
"""

import os
import sys

from setuptools import build_meta

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "dist"))
os.makedirs(out, exist_ok=True)
os.chdir(root)
name = build_meta.build_sdist(out)
print(os.path.join(out, name))
