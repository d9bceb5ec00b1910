"""Test-only: with ``PRETRAIN_TEST_STEP_SLEEP_S`` set, every optimizer step of `pretrain train`
sleeps that long first, so a test can SIGKILL a tiny run between two commits. Imported at
interpreter start when this folder is on PYTHONPATH; does nothing otherwise."""

import os

_SLEEP = float(os.environ.get("PRETRAIN_TEST_STEP_SLEEP_S", "0") or 0)

if _SLEEP > 0:
    import importlib.abc
    import sys
    import time

    class _Patch(importlib.abc.MetaPathFinder):
        """Wrap `_Attempt.step` once pipeline.train.loop has been imported."""

        def find_spec(self, name, path=None, target=None):
            if name != "pipeline.train.loop":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                step = module._Attempt.step

                def slow_step(self):
                    time.sleep(_SLEEP)
                    return step(self)

                module._Attempt.step = slow_step

            spec.loader.exec_module = exec_module
            return spec

    import importlib.util

    sys.meta_path.insert(0, _Patch())
