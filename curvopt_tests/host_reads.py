"""Counting host reads of tensors (a synchronisation on an accelerator) on the CPU, for the tests that bound
them per Krylov step, per pass and per optimizer step."""

from torch.overrides import TorchFunctionMode


class CountHostReads(TorchFunctionMode):
    """Counts the calls, made inside the mode, of the functions named in ``names`` (e.g. ``item``, ``tolist``,
    ``__float__``); host bookkeeping in numpy is not seen."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.names:
            self.count += 1
        return func(*args, **(kwargs or {}))
