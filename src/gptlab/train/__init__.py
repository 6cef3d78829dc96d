"""Pre-training: config (:mod:`.config`), optimizer and schedule (:mod:`.optim`), torchrun/DDP/FSDP
(:mod:`.distributed`), scheduled sampling (:mod:`.scheduled_sampling`), the loop (:mod:`.trainer`) and
``gptlab train`` (:mod:`.cli`). Checkpoints live in :mod:`gptlab.checkpoint`.

The package itself is callable, so that the notebook API's ``gptlab.train(cfg)`` is :func:`.trainer.train` while
``gptlab.train.trainer`` stays importable (a module's ``__class__`` may be replaced: Python data model,
"Customizing module attribute access")."""

import sys
import types
from typing import Any


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .trainer import train  # here, not at the top: `import gptlab.train.config` must not load the loop

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
