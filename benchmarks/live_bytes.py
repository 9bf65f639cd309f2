"""Peak bytes of live tensor memory on the CPU, per phase, two ways.

Shared by `benchmarks/logprobs.py`, `benchmarks/memory_cpu.py` and `tests/test_planner_measured.py`.

`AllocatedBytes` reads the CPU allocator's own records (`torch.profiler` with `profile_memory=True`): every
allocation and free with its time, kernel scratch included (the temporary `x - max` inside `logsumexp`, the
dequantized weight inside bitsandbytes' 4-bit matmul). It is what `torch.cuda.max_memory_allocated` is on a GPU, and
what the planner is checked against.

`LiveBytes` is a `TorchDispatchMode` that sees op outputs only. What it counts: every storage an op creates while the mode is active, from its creation until it is freed (a
finalizer subtracts its bytes), plus the `resident` storages given at the start (model weights, quantization state,
optimizer states), counted once. A storage first seen as an op's input existed before and is not in `resident`:
counted 0 bytes. Views and in-place results share a known storage and count nothing. Autograd's backward dispatches
in the same mode, so its gradients and temporaries are counted too. Not seen: scratch memory a kernel allocates
inside one op, because the mode only sees op outputs. Cheaper than the profiler, and it can say which op made each
byte (what `benchmarks/logprobs.py` needs).

Both: `phase(name)` (or `start_phase(name)` ... `end_phase()`) labels the time spent inside it; `phases[name]` is the
largest live total seen under that label, the `resident` tensors given at the start included (weights, quantization
state, optimizer states: allocated before the tracker started), so one tracker follows a whole training run and
reports each phase's peak.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import time
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at the same time inside the `with` block (see the module doc).

    Attributes: `now` (live bytes counted now), `peak` (largest `now` so far), `resident` (bytes of the storages given
    at the start), `phases` (peak per `phase` label).
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.known = WeakIdKeyDictionary()
        self.resident = 0
        for t in resident:
            storage = t.untyped_storage()
            if storage not in self.known:
                self._track(storage)
        self.resident = self.now = self.peak = sum(self.known.values())
        self.phases: dict[str, int] = {}
        self._label: str | None = None

    def _track(self, storage) -> None:
        nbytes = storage.nbytes()
        self.known[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def start_phase(self, name: str) -> None:
        """Label what follows `name` until `end_phase` or the next `start_phase`."""
        self._label = name
        self.phases[name] = max(self.phases.get(name, 0), self.now)

    def end_phase(self) -> None:
        self._label = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Label the block `name`: `phases[name]` becomes the peak of live bytes inside it (over every entry)."""
        outer = self._label
        self.start_phase(name)
        try:
            yield
        finally:
            self._label = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage() not in self.known:
                self.known[t.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage() not in self.known:
                storage = t.untyped_storage()
                self._track(storage)
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                if self._label is not None and self.now > self.phases[self._label]:
                    self.phases[self._label] = self.now
        return out


def resident_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Every tensor a model keeps between steps: parameters, buffers, bitsandbytes quantization state (absmax, codes,
    offsets: plain tensors on the weight, not parameters), gradients, and the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
        if p.grad is not None:
            tensors.append(p.grad)
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return tensors


class AllocatedBytes:
    """Peak bytes allocated on the CPU per phase, from the allocator's records (see the module doc).

    Use as a context manager; `phases` is filled when the block exits. Allocations made before the block are known
    only through `resident` (counted once per storage); frees of other earlier tensors would lower the count.
    """

    _PREFIX = "live_bytes.phase:"

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        storages = {}
        for t in resident:
            storages.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
        self.resident = sum(storages.values())
        self.phases: dict[str, int] = {}
        self.peak = self.resident
        self._open: torch.profiler.record_function | None = None
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self):
        # Garbage left by earlier code would be freed during the block, and the profiler records such frees (of
        # blocks it saw allocated in an earlier session) without their allocations: collect it first.
        gc.collect()
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.end_phase()
        self._profiler.__exit__(*exc)
        self._read(self._profiler.profiler.kineto_results.events())

    def start_phase(self, name: str) -> None:
        """Label what follows `name` until `end_phase` or the next `start_phase`."""
        self.end_phase()
        self._open = torch.profiler.record_function(self._PREFIX + name)
        self._open.__enter__()

    def end_phase(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(self._PREFIX + name):
            yield

    def _read(self, events) -> None:
        """Walk the allocation records in time order; each phase keeps the largest total inside its time ranges,
        the total when it starts included."""
        records = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        times, totals, now = [], [], self.resident
        for time_ns, nbytes in records:
            now += nbytes
            times.append(time_ns)
            totals.append(now)
        self.peak = max([self.resident, *totals])
        for e in events:
            if not e.name().startswith(self._PREFIX):
                continue
            first, last = bisect.bisect_left(times, e.start_ns()), bisect.bisect_right(times, e.end_ns())
            level = totals[first - 1] if first else self.resident
            name = e.name()[len(self._PREFIX) :]
            self.phases[name] = max(self.phases.get(name, 0), level, *totals[first:last])


class CudaPeaks:
    """The same interface on a GPU, from the CUDA caching allocator's own statistics: `phases[name]` is the largest
    `torch.cuda.max_memory_allocated()` inside the phase (everything allocated on the device, weights included),
    `reserved[name]` that of `max_memory_reserved()`, `seconds[name]` the wall time of each entry (device
    synchronized at both ends). Phases do not nest: a new one ends the open one."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):  # the allocator counts resident tensors itself
        self.phases: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}
        self._label: str | None = None
        self._start = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end_phase()

    def start_phase(self, name: str) -> None:
        self.end_phase()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak restarts from what is allocated now
        self._label, self._start = name, time.perf_counter()

    def end_phase(self) -> None:
        if self._label is None:
            return
        torch.cuda.synchronize()
        name, self._label = self._label, None
        self.seconds.setdefault(name, []).append(time.perf_counter() - self._start)
        self.phases[name] = max(self.phases.get(name, 0), torch.cuda.max_memory_allocated())
        self.reserved[name] = max(self.reserved.get(name, 0), torch.cuda.max_memory_reserved())

    @contextlib.contextmanager
    def phase(self, name: str):
        self.start_phase(name)
        try:
            yield
        finally:
            self.end_phase()
