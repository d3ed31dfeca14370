"""The adaptation methods, by name: each module of this package but `base` is one method, named as the module.

Adding a method is adding one module here (e.g. `eata.py`) that defines `METHOD`, a subclass of `base.Method`;
`names()` lists it (so TTA_METHOD accepts it) and `create()` builds it, with nothing else to register.

The interface (`base.Method`), over the frozen source model every stream shares (`Source`), one stream's
`AdaptationState` (both in app/adaptation/state.py) and a batch, in the order of the official TENT code:

- `configure(model, config, num_classes)`: the stream's model, a copy of the source's normalisation layers over its
  shared frozen backbone with the trainable parameters collected (`norm.configure`, a `ConfiguredModel`), or None
  for a method that keeps no state and predicts with the frozen source;
- `make_optimizer(params, config)`: its optimiser, or None;
- `forward(source, state, x, shared)`: the prediction, made before any update it causes (`Forward`: the logits, the
  batch's normalisation moments as `norm.recording` returns them, and what `adapt` needs, e.g. the graph); `shared`,
  when given, is this batch's pass already made with other streams' images (`SharedForward`);
- `adapt(source, state, forward)`: everything the prediction causes (statistics, entropy steps, guard resets), run
  after the answer, before the stream's next batch; `adapts(forward)`: False when there is nothing to run;
- `predicts_without_grad(state, images, source)`: whether `forward` needs no gradient, so that its pass may be
  shared with other streams' images (`norm.mixed_forward`).

`norm.py`'s `TestStatistics` (predict with test statistics, then commit the batch's moments for the images the
admission guards let in) is the base to extend for a method that adapts on top of test statistics, as `tent.py` does.

Guards (app/adaptation/guards.py) are the method's to call, through `source.guards`; resetting to the source is
`state.reset(reason, source)`. This package imports no torch (the settings name the methods before torch loads):
the modules are imported by `create()` only.
"""

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.adaptation.methods.base import Method

NOT_METHODS = {"base"}


def names() -> tuple[str, ...]:
    """Every method's name (its module's), sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_METHODS))


def create(name: str) -> "Method":
    if name not in names():
        raise ValueError(f"unknown adaptation method {name!r}; expected one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").METHOD()
