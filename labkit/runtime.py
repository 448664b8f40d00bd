"""The runtime each lesson's GPU profile needs, and the start-up check that the machine has it.

One line per lesson in LESSONS: the smallest runtime of labkit.rehearsal's RUNTIMES (the one home of
the runtime facts: GPU memory, host RAM, compute capability, sources) on which the lesson's GPU
profile runs *with today's code*, and why. "rehearsed": the peak comes from a plan of
labkit.rehearsal (`python -m labkit.rehearsal`) and `fits` with its margin; "estimate": read from the
lesson's code (how many LLaMA-7B copies are alive at once, what else sits on the GPU) and priced with
the rehearsed numbers of those pieces. When a memory plan makes a lesson smaller, change its line.

The lessons call `require(lesson, P)` right after `P = profiles.get()`. On every profile it first prints
the profile's protocol and its fingerprint (`protocol_banner`: what every perplexity of the lesson was
measured under, and so which numbers it compares with). On the CPU profile it checks nothing more. On
the GPU profile it compares the GPU's memory and compute capability with the declared runtime and
raises, naming the runtime to pick, when either falls short; less CPU RAM than the runtime has only
warns (the host figures of some runtimes are assumptions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from . import colab
from ._lesson_ids import lesson_id
from .rehearsal.harness import RUNTIMES, GiB, Runtime

GPU_SLACK = 0.02  # a GPU may report up to 2% less memory than the runtime's figure (driver, ECC) and still pass
HOST_SLACK = 0.10  # CPU RAM: 10% less than the runtime's figure before warning (several figures are assumptions)


@dataclass(frozen=True)
class Need:
    runtime: str  # a key of RUNTIMES: the smallest runtime the lesson's GPU profile fits today
    basis: str  # "rehearsed" (a labkit.rehearsal plan) or "estimate" (read from the lesson's code)
    why: str  # one line: what needs that much
    min_sm: int = 75  # compute capability the lesson's GPU code needs (e.g. 80: 2:4 sparse kernels)


# Rehearsed peaks at LLaMA-7B fp16 (python -m labkit.rehearsal): load + generate + perplexity 13.04 GiB;
# a calibration walk with the model on the GPU (models.load puts it there) ~16-18 GiB; two fp16 copies on the
# GPU 25.1 GiB; three 37.65 GiB. GPU budgets with fits()'s margin: T4 12.8, L4 19.8, A100-40 35.0 GiB.
LESSONS = {
    "00": Need("L4", "rehearsed", "load, generate and perplexity peak at 13.04 GiB, over the T4's 12.8 GiB budget"),
    "01": Need(
        "L4",
        "rehearsed",
        "one model on the GPU at a time, global magnitude's threshold by a radix select (no fp32 concatenation): "
        "15.24 GiB GPU peak (prune.wanda's walk), 12.55 GiB host (wanda_50's weights kept in CPU memory for the "
        "storage formats), over the T4's budgets",
    ),
    "02": Need(
        "L4",
        "rehearsed",
        "SparseGPT's walk with the model on the GPU peaks at 16.85 GiB (L4 budget 19.8), host 2.76 GiB with 2 of "
        "32 layers walked (the replaced weights parked in CPU memory grow to ~12 GiB over all 32); the 2:4 timing "
        "needs sm80+ sparse kernels",
        min_sm=80,
    ),
    "03": Need(
        "A100-40",
        "rehearsed",
        "a second copy beside `model` for FLaP, LLM-Pruner and the LoRA recovery: 28.15 GiB GPU peak (the "
        "recovery), 12.10 GiB host (the weights all_or_nothing parks in CPU memory)",
    ),
    "04": Need(
        "L4",
        "rehearsed",
        "one model at a time (cell 31 frees `model` before the RTN copies): 16.35 GiB GPU peak (an RTN copy), "
        "12.18 GiB host (the weights all_or_nothing parks in CPU memory), over the T4's budgets",
    ),
    "05": Need(
        "L4",
        "rehearsed",
        "the Hessian walk and GPTQ's walk with the model on the GPU peak at 16.19 GiB (L4 budget 19.8), "
        "12.06 GiB host (RTN's parked weights); one model at a time from cell 28",
    ),
    "05b": Need(
        "L4",
        "estimate",
        "one 7B model at a time: AWQ's walk holds what GPTQ's does (16.19 GiB rehearsed for lesson 05, plus one "
        "[in, in] Hessian per group of linears); the LoRA recoveries train rank-8 adapters on one model (the 4-bit "
        "AWQ model, then the dense control, 13.5 GB) with 2 x 128-token batches",
    ),
    "06": Need(
        "A100-40",
        "rehearsed",
        "SmoothQuant's copy is loaded and calibrated while `model` is alive: 27.68 GiB GPU peak, 12.06 GiB host",
    ),
    "07": Need(
        "A100-40",
        "rehearsed",
        "the 7B teacher, the 16-layer student and one trained copy on the GPU at once; the students train rank-8 "
        "LoRA adapters (AdamW on every weight would add 50 GiB): 29.72 GiB GPU peak (block-wise: the teacher's "
        "hidden states at every layer boundary, 4.1 GiB), over the L4's 19.8 GiB budget",
    ),
    "08": Need(
        "L4",
        "rehearsed",
        "one 7B model at a time (cell 10 frees `model`; each factored model and the LoRA control is a fresh load): "
        "SVD-LLM's activation-aware walk peaks at 17.33 GiB GPU with 2 of 32 layers walked, the LoRA recoveries at "
        "14.2 GiB GPU and 12.1 GiB host (the weights all_or_nothing parks in CPU memory while the adapters are "
        "merged), over the T4's budgets",
    ),
    "09": Need(
        "L4",
        "rehearsed",
        "peak 14.2 GiB: the model, the 2048-token KV cache of the timing cell (1 GiB, kept) and the next one "
        "being filled, over the T4's 12.8 GiB budget",
    ),
    "10": Need(
        "L4",
        "rehearsed",
        "peak 13.35 GiB GPU (the model and layer 0's W4A16 packing) and 12.1 GiB host (fuse parks the replaced fp16 "
        "weights in CPU memory for its all-or-nothing restore): over the T4's 12.8 GiB GPU and 9.1 GiB RAM budgets",
    ),
    "10b": Need(
        "L4",
        "estimate",
        "the model (13.5 GB) and its 4-bit draft (~3.9 GB, quantized in CPU memory, then moved): ~17.4 GB; "
        "section 3 (draft freed): 4096-token windows, a 2 GiB fp16 cache, its dequantized copy and the window's "
        "logits (~0.8 GB) beside the model, ~18.8 GB, within the L4's 19.8 GiB budget; host: the draft's fp16 "
        "load (13.5 GB)",
    ),
    "11": Need(
        "T4",
        "rehearsed",
        "peak 0.3 GiB GPU, 0.8 GiB host: the demonstrations run SmolLM2-135M on every profile; LLaMA-7B is not loaded",
    ),
    "12": Need(
        "A100-40",
        "rehearsed",
        "one compressed 7B model at a time (cell 15 compresses `model` itself, cell 20 reloads the dense one as "
        "the teacher): the FLaP-20% student trains rank-8 LoRA adapters beside the teacher and the packed "
        "SparseGPT+GPTQ model, 31.87 GiB GPU peak, 12.06 GiB host (the weights all_or_nothing parks in CPU memory)",
    ),
}


@dataclass(frozen=True)
class Machine:
    gpu: str  # the GPU's name, e.g. "Tesla T4"
    gpu_bytes: int  # torch.cuda.get_device_properties(device).total_memory
    sm: int  # compute capability, e.g. 75
    host_bytes: int  # total CPU RAM


def lesson_key(lesson: int | str) -> str:
    """A key of LESSONS ('00', ..., '05', '05b', ..., '12') from 0, '0', '00', '05b' or a notebook name like
    '00_baseline' or '05b_awq_and_qlora' (labkit.course.lesson_id: the one rule of lesson ids)."""
    text = str(lesson)
    try:
        key = lesson_id(text)
    except ValueError:  # not an id nor a lesson's name: a bare number ('0', '5') or nothing valid
        key = text
    if key.isdigit() and f"{int(key):02d}" in LESSONS:
        return f"{int(key):02d}"
    if key in LESSONS:
        return key
    raise ValueError(f"lesson={lesson!r}: allowed are {list(LESSONS)} (or their numbers, or a notebook name).")


def need(lesson: int | str) -> Need:
    return LESSONS[lesson_key(lesson)]


def declared(lesson: int | str) -> Runtime:
    return RUNTIMES[need(lesson).runtime]


def colab_gpu_type(lesson: int | str) -> str:
    """What the notebook's metadata asks Colab for: the runtime's Colab choice, else Colab's largest (A100)."""
    return declared(lesson).colab or "A100"


def first_cell_line(lesson: int | str) -> str:
    """The line the lesson's first cell carries (tests/test_runtime.py checks it)."""
    n = need(lesson)
    return f"**Runtime (GPU profile):** {RUNTIMES[n.runtime].name} or larger ({n.basis}: {n.why})."


def machine(device: int = 0) -> Machine:
    """This machine's GPU `device` and CPU RAM."""
    import psutil
    import torch

    props = torch.cuda.get_device_properties(device)
    return Machine(props.name, props.total_memory, 10 * props.major + props.minor, psutil.virtual_memory().total)


def problems(lesson: int | str, have: Machine) -> tuple[list[str], list[str]]:
    """(what makes `have` unable to run the lesson's GPU profile, what only might): plain sentences."""
    n, runtime = need(lesson), declared(lesson)
    hard, soft = [], []
    if have.gpu_bytes < runtime.gpu_bytes * (1 - GPU_SLACK):
        hard.append(f"GPU memory {have.gpu_bytes / GiB:.1f} GiB < {runtime.gpu_bytes / GiB:.1f} GiB")
    if have.sm < n.min_sm:
        hard.append(f"compute capability {have.sm / 10:.1f} < {n.min_sm / 10:.1f}")
    if have.host_bytes < runtime.host_bytes * (1 - HOST_SLACK):
        soft.append(f"CPU RAM {have.host_bytes / GiB:.1f} GiB < {runtime.host_bytes / GiB:.1f} GiB")
    return hard, soft


def advice(lesson: int | str) -> str:
    """What to pick instead: the declared runtime on Colab, or the CPU profile."""
    runtime = declared(lesson)
    if runtime.colab:
        where = f"Colab: Runtime > Change runtime type > {runtime.colab} GPU"
    else:
        where = "Colab's runtime menu has no GPU this large (its A100 has 40 GB): use an 80 GB A100 or H100 machine"
    return f"Pick {runtime.name} or larger ({where}), or run the CPU profile (PROFILE = 'cpu' in the set-up cell)."


def protocol_banner(profile) -> str:
    """The lines a lesson prints at its top: the profile's main protocol (labkit.profiles.Protocol.describe)
    and, when sweeps use fewer windows, the sweeps' fingerprint. Results of two fingerprints never compare."""
    main, sweep = profile.protocol("eval"), profile.protocol("sweep")
    lines = [main.describe()]
    if sweep.fingerprint != main.fingerprint:
        windows = "all windows" if sweep.eval_windows is None else f"first {sweep.eval_windows} windows"
        lines.append(f"curves and sweeps: protocol {sweep.fingerprint} (the same, on the {windows})")
    return "\n".join(lines)


def require(lesson: int | str, profile, device: int = 0) -> Machine | None:
    """Print the profile's protocol (protocol_banner), then check at start-up that this machine has the
    runtime `lesson`'s GPU profile needs (see LESSONS).

    CPU profile: no check (returns None). GPU profile: RuntimeError when GPU memory or compute capability
    fall short, naming the runtime to pick; a warning when only CPU RAM does. Returns the Machine."""
    key = lesson_key(lesson)
    if callable(getattr(profile, "protocol", None)):
        print(protocol_banner(profile))
    if getattr(profile, "device", None) != "cuda":
        return None
    have = machine(device)
    hard, soft = problems(key, have)
    n = LESSONS[key]
    head = f"Lesson {key}'s GPU profile needs {RUNTIMES[n.runtime].name} or larger ({n.basis}: {n.why})"
    if hard:
        raise RuntimeError(f"{head}. This machine ({have.gpu}) has {'; '.join(hard + soft)}. {advice(key)}")
    if soft:
        warnings.warn(
            f"{head}. This machine ({have.gpu}) has {'; '.join(soft)}: it may run out. {advice(key)}", stacklevel=2
        )
    return have


def markdown_table() -> str:
    """Lesson → runtime → why, as the README shows it (tests/test_runtime.py checks that it does)."""
    lines = ["| lesson | GPU-profile runtime | basis | why |", "|---|---|---|---|"]
    for key, n in LESSONS.items():
        sm = f" (sm{n.min_sm}+)" if n.min_sm > 75 else ""
        lines.append(f"| {key} | {RUNTIMES[n.runtime].name}{sm} | {n.basis} | {n.why} |")
    return "\n".join(lines)


# --- keeping the notebooks in step: `python -m labkit.runtime` ---------------------------------------

RUNTIME_LINE = "**Runtime (GPU profile):**"  # how the first cell's runtime line starts
PROFILE_LINE = "P = profiles.get()"


def sync_notebook(nb, lesson: str) -> bool:
    """Bring lesson `lesson`'s notebook (an nbformat node, changed in place) in step with LESSONS and
    labkit.colab.SETUP_CELL: the runtime line of the first cell, the set-up cell (cell 1), the `require` call
    after `P = profiles.get()`, the Colab and labkit metadata. Outputs are kept. Returns whether anything changed."""
    before = repr((nb.metadata, [cell.source for cell in nb.cells]))
    first = nb.cells[0]
    if first.cell_type != "markdown":
        raise ValueError(f"lesson {lesson}: cell 0 must be the title's markdown cell, got a {first.cell_type} cell.")
    lines = first.source.split("\n")
    if any(line.startswith(RUNTIME_LINE) for line in lines):  # replace the previous runtime line and its blank line
        old = next(i for i, line in enumerate(lines) if line.startswith(RUNTIME_LINE))
        del lines[old - 1 if old and lines[old - 1] == "" else old : old + 1]
    badge = next((i for i, line in enumerate(lines) if "colab-badge" in line), None)
    if badge is None:
        raise ValueError(f"lesson {lesson}: cell 0 has no 'Open In Colab' badge to put the runtime line under.")
    lines[badge + 1 : badge + 1] = ["", first_cell_line(lesson)]
    first.source = "\n".join(lines)

    if nb.cells[1].cell_type != "code" or not nb.cells[1].source.startswith("# Set-up."):
        raise ValueError(f"lesson {lesson}: cell 1 must be the set-up code cell ('# Set-up. ...').")
    nb.cells[1].source = colab.SETUP_CELL

    cell = profile_cell(nb, lesson)
    code = [line for line in cell.source.split("\n") if not line.startswith("runtime.require(")]
    imports = [i for i, line in enumerate(code) if line.startswith("from labkit import ") and "profiles" in line]
    if len(imports) != 1:
        raise ValueError(f"lesson {lesson}: the profile cell needs one 'from labkit import ..., profiles, ...' line.")
    names = code[imports[0]].removeprefix("from labkit import ").split(", ")
    code[imports[0]] = "from labkit import " + ", ".join(sorted({*names, "runtime"}))
    at = code.index(PROFILE_LINE)
    code.insert(at + 1, require_line(lesson))
    cell.source = "\n".join(code)

    nb.metadata["accelerator"] = "GPU"
    nb.metadata.setdefault("colab", {})["gpuType"] = colab_gpu_type(lesson)
    nb.metadata["labkit"] = {"runtime": need(lesson).runtime}
    return before != repr((nb.metadata, [cell.source for cell in nb.cells]))


def require_line(lesson: str) -> str:
    return f'runtime.require("{lesson}", P)  # this machine has the runtime of the first cell (CPU profile: nothing)'


def profile_cell(nb, lesson: str):
    """The code cell with `P = profiles.get()` (one per lesson)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and PROFILE_LINE in c.source.split("\n")]
    if len(cells) != 1:
        raise ValueError(
            f"lesson {lesson}: need exactly one code cell with the line {PROFILE_LINE!r}, found {len(cells)}."
        )
    return cells[0]


def sync_readme(text: str) -> str:
    """`text` (the README) with its runtime table replaced by markdown_table()."""
    header = markdown_table().split("\n", 1)[0]
    if text.count(header) != 1:
        raise ValueError(f"the README needs exactly one runtime table starting with {header!r}.")
    start = text.index(header)
    end = text.find("\n\n", start)
    return text[:start] + markdown_table() + (text[end:] if end != -1 else "\n")


def main() -> None:
    """After changing LESSONS: bring the lessons' first cells, set-up cells, checks and metadata, and the
    README's table, in step (`python -m labkit.runtime`)."""
    import nbformat

    from .course import ROOT, lessons

    for path in lessons():
        nb = nbformat.read(path, as_version=4)
        if sync_notebook(nb, lesson_id(path)):
            nbformat.write(nb, path)
            print(f"updated {path.name}")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if sync_readme(text) != text:
        readme.write_text(sync_readme(text), encoding="utf-8")
        print("updated README.md")


if __name__ == "__main__":
    main()
