"""Memory rehearsal: run a lesson's GPU-profile code at LLaMA-7B's real shapes, on CPU, without weights.

Why: the GPU profile (LLaMA-7B fp16 on a Colab T4, L4 or A100) never runs in CI, so a plan that
needs more memory than the runtime has is found only on Colab, after a 13.5 GB download. Here the
same code runs on *fake* tensors (PyTorch's FakeTensorMode): every op computes shapes, dtypes and
devices but no values, so a 7B forward pass takes seconds and no memory, and we count what the
real run would allocate.

Two devices. Fake CUDA tensors fail on a CPU-only torch build, so two fake CPU devices stand in:

    GPU  = cpu:1   what the plan puts on the accelerator (the profile's "cuda")
    HOST = cpu     everything else: CPU RAM (the default device, `.cpu()`, tensors made without a device)

FakeTensorMode refuses an op that mixes cpu:1 and cpu tensors, exactly as CUDA refuses cuda and cpu
(0-dim CPU scalars excepted, as on CUDA; a 0-dim cpu:1 tensor among CPU tensors, which FakeTensorMode
lets through as a "CPU scalar", is refused by the rehearsal itself), so a device mismatch crashes the
rehearsal as it would crash Colab. The model "in CPU memory" is a fake model on HOST: its bytes are
counted, none is used.
Why not fake "cuda": on a CPU-only build, indexing (`t[None]`), `cumsum` and other ops that take a
CUDA device guard before reaching Python raise "PyTorch is not linked with support for cuda devices".
What the stand-in changes: code that branches on `device.type == "cuda"` (CUDA syncs, the GPU peak of
evaluate.peak_memory) takes its CPU branch; torch.cuda.is_available() stays False, so plans pass
`GPU` explicitly. Two fixes keep torch working on the stand-in, both only inside `rehearse`:
nn.Module.to() on fake parameters fails in torch.utils.swap_tensors (FakeTensorMode's converter
memo holds weak references to them; it is cleared before each swap), and torch.tensor(...,
device=cpu:1) loses the device index (the result is re-made on GPU).

Accounting. A dispatch mode above FakeTensorMode sees every op's outputs; each new storage is
counted on its device (GPU sizes rounded up to 512 bytes like the CUDA caching allocator) until
Python frees it (a weakref callback), and the peak per device is kept, overall and per phase. This
is torch.cuda.max_memory_allocated for each device: the allocator's cache, fragmentation and the
CUDA context are not in it; `fits` leaves room for them.

Values the rehearsal cannot know. Code that looks at a tensor's values (`.item()`, `if t.any():`,
`torch.nonzero`) cannot run on fake tensors. The rehearsal answers each such query with the
"nothing unusual" value, decided by the op that produced the tensor: `all`/`isfinite`/`allclose`/
`equal` -> True (the data is finite and valid), other boolean results (comparisons, `any`) -> False
(no out-of-range token, no NaN, generation not finished), numbers -> 1, `nonzero` -> no element
(no dead input). Every query is recorded with its file:line in `Report.queries`: each one is a
place where the real run synchronises the GPU, and the list shows the lead where a plan depends on
data. A loop that ends on data (generation until EOS) is ended by the plan with
`rehearsal.assume(part_of_the_line, lambda n: n >= steps)`; one asked MAX_REPEATS times raises.

A plan is a function of the Rehearsal: it builds models with `llama_7b(device)`, calls labkit as a
lesson would (with `GPU` where the profile says "cuda"), and may mark phases:

    def plan(r):
        with r.phase("load"):
            model = llama_7b(GPU)
        with r.phase("perplexity"):
            evaluate.perplexity(model, tokens(1, 2 * 2048), 2048, progress=False)

    report = rehearse(plan)          # Report: peak_gpu, peak_host, phases, queries, notes, seconds
    fits(report, "T4")               # Fit: ok, the budgets, and why not
    print(table([report]))           # plan | peak GPU | peak host | fits T4, L4, A100-40, A100-80

Loops that repeat the same shapes (perplexity windows, decoder layers, generated tokens) reach
their peak by the second iteration (not always the first: a loop that keeps one iteration's tensors
alive into the next, as evaluate.perplexity did with a window's logits, peaks in the second); plans run
two or more of them and say so (`Report.notes`).
"""

from __future__ import annotations

import contextlib
import linecache
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GPU = torch.device("cpu", 1)  # stands in for the profile's "cuda"
HOST = torch.device("cpu")  # CPU RAM
GiB = 2**30
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes

# LLaMA-7B (huggyllama/llama-7b, the model of the GPTQ, SparseGPT and Wanda papers), config.json.
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA_7B_PARAMS = 6_738_415_616  # parameter count of LLaMA-7B


# --- runtimes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    name: str
    gpu_bytes: int  # what torch.cuda.get_device_properties(0).total_memory reports
    host_bytes: int  # MemTotal of the VM (what Colab shows as "System RAM")
    sm: int  # compute capability, e.g. 75 for 7.5
    source: str
    colab: str = ""  # Colab's choice in Runtime > Change runtime type (and the notebook's gpuType); "" = not offered


RUNTIMES = {
    "T4": Runtime(
        "Colab T4 (free)",
        int(14.75 * GiB),
        int(12.67 * GiB),
        75,
        "GPU: '14.75 GiB total capacity' in torch's OOM message on Colab's Tesla T4 (16 GB card, 15360 MiB in "
        "nvidia-smi less ECC); host: Colab's 'System RAM 12.7 GB' (MemTotal ≈ 13.29e9 B). sm75: no bf16 tensor "
        "cores, no FP8, no 2:4 sparse kernels.",
        colab="T4",
    ),
    "L4": Runtime(
        "Colab L4",
        int(22.5 * GiB),
        int(53.0 * GiB),
        89,
        "GPU: 23034 MiB in nvidia-smi; host: Colab's L4 runtime shows 'System RAM 53 GB' (assumed; check on Colab).",
        colab="L4",
    ),
    "A100-40": Runtime(
        "Colab A100 40 GB",
        int(39.39 * GiB),
        int(83.5 * GiB),
        80,
        "GPU: '39.39 GiB total capacity' in torch's OOM message on an A100-SXM4-40GB; host: Colab's A100 runtime "
        "shows 'System RAM 83.5 GB'.",
        colab="A100",
    ),
    "A100-80": Runtime(
        "A100 80 GB",
        int(79.15 * GiB),
        int(167.0 * GiB),
        80,
        "GPU: '79.15 GiB total capacity' (A100-SXM4-80GB); host: 167 GB assumed (a high-RAM runtime), unverified.",
    ),
}

# What a runtime loses before the lesson allocates anything (assumptions, to be measured on Colab):
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context, cuBLAS workspace, kernels loaded on the GPU
HOST_BASELINE_BYTES = int(2.5 * GiB)  # the VM's services, Jupyter, Python with torch + transformers + CUDA runtime
MARGIN = 0.10  # of the remainder, kept free for the caching allocator's fragmentation and what the rehearsal misses


@dataclass
class Fit:
    ok: bool
    runtime: str
    gpu_need: int
    gpu_budget: int
    host_need: int
    host_budget: int
    why: str


def fits(report: Report, runtime: Runtime | str, margin: float = MARGIN) -> Fit:
    """Does the plan of `report` fit `runtime`? Budgets: GPU (total − CUDA context) · (1 − margin);
    host (RAM − baseline) · (1 − margin). Both peaks must be within their budgets."""
    if isinstance(runtime, str):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: allowed are {list(RUNTIMES)}, or a Runtime.")
        runtime = RUNTIMES[runtime]
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin!r}: need a fraction in [0, 1), e.g. {MARGIN}.")
    gpu_budget = int((runtime.gpu_bytes - CUDA_CONTEXT_BYTES) * (1 - margin))
    host_budget = int((runtime.host_bytes - HOST_BASELINE_BYTES) * (1 - margin))
    problems = []
    if report.peak_gpu > gpu_budget:
        problems.append(f"GPU peak {report.peak_gpu / GiB:.2f} GiB > budget {gpu_budget / GiB:.2f} GiB")
    if report.peak_host > host_budget:
        problems.append(f"host peak {report.peak_host / GiB:.2f} GiB > budget {host_budget / GiB:.2f} GiB")
    why = "; ".join(problems) if problems else "fits"
    return Fit(not problems, runtime.name, report.peak_gpu, gpu_budget, report.peak_host, host_budget, why)


# --- the rehearsal -------------------------------------------------------------------------------


@dataclass
class Query:
    site: str  # file:line: source, where the value was asked for
    op: str  # what asked: item/bool (_local_scalar_dense), nonzero, equal, allclose
    produced_by: str  # the op that made the tensor
    answer: object  # the last answer given
    count: int = 1


@dataclass
class Report:
    plan: str
    peak_gpu: int = 0
    peak_host: int = 0
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (peak GPU, peak host) bytes
    queries: list[Query] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"{self.plan}: peak GPU {self.peak_gpu / GiB:.2f} GiB, peak host {self.peak_host / GiB:.2f} GiB "
            f"({self.seconds:.1f} s)"
        ]
        lines += [f"  {name}: GPU {g / GiB:.2f} GiB, host {h / GiB:.2f} GiB" for name, (g, h) in self.phases.items()]
        lines += [f"  assumed {q.op} -> {q.answer!r} ({q.produced_by}, x{q.count}) at {q.site}" for q in self.queries]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_ATEN = torch.ops.aten
MAX_REPEATS = 100_000  # value queries at one site before the rehearsal suspects an endless loop
_TRUE_PRODUCERS = {"all", "isfinite", "logical_not"}  # "all finite", "all valid" -> True


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1] if hasattr(func, "_schema") else str(func)


class Rehearsal(TorchDispatchMode):
    """Counts every storage's bytes on its device and answers value queries (see the module docstring)."""

    def __init__(self, plan: str):
        super().__init__()
        self.report = Report(plan)
        self.current = {GPU: 0, HOST: 0}
        self._storages: dict[int, tuple[weakref.ref, torch.device, int]] = {}
        self._producers = WeakIdKeyDictionary()  # bool/number tensor -> op name that produced it
        self._queries: dict[tuple[str, str, str], Query] = {}
        self._phases: list[list] = []  # open phases: [name, peak GPU, peak host]
        self._assumed: list[tuple[str, object]] = []

    # accounting
    def _add(self, t: torch.Tensor) -> None:
        device = t.device if t.device == GPU else HOST if t.device.type == "cpu" else None
        if device is None:  # meta tensors hold no memory
            return
        st = t.untyped_storage()
        key = id(st)
        nbytes = st.nbytes()
        if device == GPU:
            nbytes = -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK
        if key in self._storages:
            ref, dev, old = self._storages[key]
            if ref() is st:
                if old != nbytes:  # resized in place
                    self._storages[key] = (ref, dev, nbytes)
                    self.current[dev] += nbytes - old
                    self._peak()
                return
        self._storages[key] = (weakref.ref(st, lambda _, k=key: self._free(k)), device, nbytes)
        self.current[device] += nbytes
        self._peak()

    def _free(self, key: int) -> None:
        _, device, nbytes = self._storages.pop(key)
        self.current[device] -= nbytes

    def _peak(self) -> None:
        gpu, host = self.current[GPU], self.current[HOST]
        r = self.report
        r.peak_gpu, r.peak_host = max(r.peak_gpu, gpu), max(r.peak_host, host)
        for p in self._phases:
            p[1], p[2] = max(p[1], gpu), max(p[2], host)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Record the peaks of GPU and host memory while the block runs, as report.phases[name]."""
        entry = [name, self.current[GPU], self.current[HOST]]
        self._phases.append(entry)
        try:
            yield
        finally:
            self._phases.remove(entry)
            self.report.phases[name] = (entry[1], entry[2])

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    # value queries
    def assume(self, where: str, answer) -> None:
        """Answer the value queries whose site (file:line: source) contains `where` with `answer`, or with
        answer(n) for the n-th such query (from 0) if it is callable, e.g. to end a generation loop."""
        self._assumed.append((where, answer))

    def _ask(self, op: str, t: torch.Tensor | None, answer_for: Callable[[str], object]):
        producer = self._producers.get(t, "?") if t is not None else "?"
        site = _call_site()
        key = (site, op, producer)
        query = self._queries.get(key)
        if query is None:
            query = self._queries[key] = Query(site, op, producer, None, 0)
            self.report.queries.append(query)
        if query.count >= MAX_REPEATS:
            raise RuntimeError(
                f"the rehearsal answered {query.count} value queries at {site}: a loop that ends on data? "
                f"End it with rehearsal.assume(<part of that line>, lambda n: ...)."
            )
        answer = answer_for(producer)
        for where, assumed in self._assumed:
            if where in site:
                answer = assumed(query.count) if callable(assumed) else assumed
        query.count += 1
        query.answer = answer
        return answer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ATEN._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return self._ask("item/bool", t, lambda p: p in _TRUE_PRODUCERS)
            return self._ask("item", t, lambda p: 1.0 if t.dtype.is_floating_point else 1)
        if func in (_ATEN.equal.default, _ATEN.allclose.default):
            return self._ask(_op_name(func), None, lambda p: True)
        _check_devices(func, args, kwargs)
        if func is _ATEN.nonzero.default:
            self._ask("nonzero", args[0], lambda p: "no element")
            out = torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
        else:
            out = func(*args, **kwargs)
        name = None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
                if t.numel() <= 1 or t.dtype == torch.bool:  # may be asked for its value later
                    name = name or _op_name(func)
                    self._producers[t] = name
        return out


_MOVES = {_ATEN._to_copy.default, _ATEN.copy_.default, _ATEN.copy.default}  # ops that move data between devices


def _check_devices(func, args, kwargs) -> None:
    """FakeTensorMode lets a 0-dim tensor on any "cpu" device join CPU tensors, which covers the stand-in GPU
    (cpu:1); CUDA allows that only for 0-dim *CPU* tensors. Refuse a 0-dim GPU tensor in an op on host tensors
    (e.g. torch.randn(n) * w_on_gpu.std()), with CUDA's message."""
    if func in _MOVES:
        return
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(t.device == GPU and t.dim() == 0 for t in tensors) and any(
        t.device == HOST and t.dim() > 0 for t in tensors
    ):
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {GPU} (the stand-in "
            f"GPU) and cpu! ({_op_name(func)}: a 0-dim GPU tensor with CPU tensors, refused by CUDA)"
        )


class _KeepStandInDevice(TorchFunctionMode):
    """torch.tensor(data, device=cpu:1) builds on the CPU, where the device index is dropped, before fake
    mode sees it; on CUDA the result would be on the GPU. Put such results on the stand-in GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        device = kwargs.get("device")
        if device is not None and isinstance(out, torch.Tensor) and torch.device(device) == GPU and out.device != GPU:
            out = torch.empty(out.shape, dtype=out.dtype, device=GPU)  # a copy would stay a CPU constant
        return out


def _call_site() -> str:
    """file:line: source of the innermost frame outside torch and this module (the code that asked)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/torch/" not in path and not path.endswith("labkit/rehearsal/harness.py") and "/contextlib.py" not in path:
            short = path.split("site-packages/")[-1]
            if "/labkit/" in short:
                short = "labkit/" + short.split("/labkit/")[-1]
            line = linecache.getline(path, frame.f_lineno).strip()
            return f"{short}:{frame.f_lineno}: {line}"
        frame = frame.f_back
    return "?"


@contextlib.contextmanager
def _swappable_fake_parameters(mode):
    """nn.Module.to() swaps a fake parameter with its moved copy (torch.utils.swap_tensors), which refuses
    tensors that have weak references; FakeTensorMode's converter memo holds some. Clearing the memo
    before each swap (it only caches conversions of real tensors) lets `.to(device)` move fake modules."""
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.storage_memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def rehearse(plan: Callable[[Rehearsal], object], name: str | None = None) -> Report:
    """Run plan(rehearsal) on fake tensors and return its Report (peaks per device and phase, queries)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    rehearsal = Rehearsal(name or getattr(plan, "__name__", "plan"))
    with fake, _swappable_fake_parameters(fake), rehearsal, _KeepStandInDevice(), torch.no_grad():
        plan(rehearsal)
    rehearsal.report.seconds = time.perf_counter() - start
    return rehearsal.report


# --- building blocks for plans -------------------------------------------------------------------


def table(reports: list[Report], runtimes=("T4", "L4", "A100-40", "A100-80"), margin: float = MARGIN) -> str:
    """A Markdown table: plan | peak GPU GiB | peak host GiB | fits each runtime (with `margin`)."""
    head = "| plan | peak GPU GiB | peak host GiB | " + " | ".join(runtimes) + " |"
    rows = [head, "|" + "---|" * (3 + len(runtimes))]
    for r in reports:
        marks = []
        for name in runtimes:
            fit = fits(r, name, margin)
            short = [d for d in ("GPU", "host") if f"{d} peak" in fit.why]
            marks.append("yes" if fit.ok else "no: " + " + ".join(short))
        rows.append(f"| {r.plan} | {r.peak_gpu / GiB:.2f} | {r.peak_host / GiB:.2f} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def llama_7b_config(dtype=torch.float16):
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_7B, dtype=dtype)


def llama_7b(device=GPU, dtype=torch.float16, config=None):
    """LLaMA-7B with fake weights on `device` (GPU or HOST), in eval mode. Call inside a rehearsal."""
    from transformers import LlamaForCausalLM

    config = config or llama_7b_config(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    # rotary inv_freq is a float32 buffer computed at init; to_empty keeps dtypes and allocates each tensor
    return model.to_empty(device=device).eval()


def tokens(batch: int, length: int, device=HOST, vocab: int = LLAMA_7B["vocab_size"]) -> torch.Tensor:
    """Fake token ids [batch, length] (int64)."""
    return torch.randint(0, vocab, (batch, length), device=device)


def profile(name: str = "gpu"):
    """The profile `name` as the rehearsal runs it: its "cuda" device replaced by the stand-in GPU.
    Works without CUDA (profiles.get(name, rehearse=True)); profiles.get() itself is unchanged."""
    import dataclasses

    from .. import profiles

    p = profiles.get(name, rehearse=True)
    return dataclasses.replace(p, device=str(GPU)) if p.device == "cuda" else p
