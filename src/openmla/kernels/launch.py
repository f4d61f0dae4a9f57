"""Launch a Triton kernel without the JIT's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument in Python on each
call: on the H100 machine's host that measured 61 us a launch against 14 us for the compiled
kernel's own launcher (``benchmarks/bench_launch.py``), and a decode call is two launches. Here
the first launch of a given specialisation goes through the JIT (compiling if needed) and
records the compiled kernel; later launches with the same key call its launcher directly.

The key holds everything the JIT specialises on, and more: the device (of the first argument, a
tensor; the callers' checks keep every tensor on one device), each tensor's dtype and 16-byte
alignment, every other argument's exact value, the keyword arguments. A launch that
differs in any of them takes the JIT path again (and is cached in turn). Under the interpreter,
or with Triton launch hooks set (profilers), every launch goes through the JIT.
"""

from __future__ import annotations

import torch
import triton

from openmla._interp import is_interpreting

_CACHE: dict[tuple, tuple] = {}
_CAPACITY = 4096
_BROKEN = False  # set when this triton's JIT internals differ from what the fast path expects
_JIT_ONLY = object()  # marks a key whose launches keep the JIT path


def _key(fn, device: int, args: tuple, kwargs: dict) -> tuple:
    return (fn, device, *[(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args],
            *kwargs.items())


def hooks_set() -> bool:
    rt = triton.knobs.runtime
    return any(_hook_active(h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _hook_active(hook) -> bool:
    # a plain callable, or (triton >= 3.5) a HookChain that is set when it holds calls
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(fn, grid: tuple[int, ...], args: tuple, kwargs: dict) -> tuple | None:
    """``fn[grid](*args, **kwargs)``: ``args`` are the kernel's leading positional parameters,
    ``kwargs`` its constexprs and launch options (num_warps, ...). Returns what later launches
    with the same key can give :func:`run_recorded` (None: they keep the JIT path)."""
    device = args[0].get_device()
    key = _key(fn, device, args, kwargs)
    hit = _CACHE.get(key)  # never set under the interpreter or once the fast path broke
    if hit is not None and hit is not _JIT_ONLY and not hooks_set():
        run_recorded(hit, grid, device, args)
        return hit
    kernel = fn[grid](*args, **kwargs)
    if hit is None and not (_BROKEN or is_interpreting() or hooks_set()):
        _remember(key, fn, kernel, device, args, kwargs)
    hit = _CACHE.get(key)
    return None if hit is _JIT_ONLY else hit


def run_recorded(hit: tuple, grid: tuple[int, ...], device: int, args: tuple) -> None:
    """Launch a recorded kernel on the current stream; ``args`` must match the key it was
    recorded under. Callers check :func:`hooks_set` first."""
    kernel, tail = hit
    g = (*grid, 1, 1)
    stream = torch._C._cuda_getCurrentRawStream(device)
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
               *args, *tail)


def _remember(key: tuple, fn, kernel, device: int, args: tuple, kwargs: dict) -> None:
    """Store the compiled kernel and the values of its parameters after ``args`` (constexprs and
    defaults, in signature order) as the JIT binds them."""
    global _BROKEN
    try:
        binder = fn.device_caches[device][4]
        values = list(binder(*args, **kwargs)[0].values())
        kernel.function  # noqa: B018 - loaded by the JIT launch; fail here, not on a later launch
    except Exception:  # noqa: BLE001 - another triton version: stay on the JIT path
        _BROKEN = True
        return
    if len(_CACHE) >= _CAPACITY:  # keys hold exact sizes (the merge's token count): stay bounded
        _CACHE.clear()
    if len(values) < len(args) or any(v is not a for v, a in zip(values, args)):
        # the JIT bound the positional arguments otherwise (e.g. specialised one away): this
        # specialisation keeps the JIT path, the others keep theirs
        _CACHE[key] = _JIT_ONLY
        return
    _CACHE[key] = (kernel, tuple(values[len(args):]))


def slow_paths() -> int:
    """How many recorded specialisations launch through the JIT (-1: all of them)."""
    return -1 if _BROKEN else sum(1 for v in _CACHE.values() if v is _JIT_ONLY)


def clear() -> None:
    """Forget the recorded kernels (tests)."""
    _CACHE.clear()
