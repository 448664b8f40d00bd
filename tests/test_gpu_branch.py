"""The GPU profile's code paths, exercised in CI without a GPU (issue 14, item 4).

The GPU profile runs LLaMA-7B in fp16 on CUDA; CI has neither. Three stand-ins catch its failures here:
- dtype: the labkit calls each lesson's GPU profile makes, run on tiny-llama-random in fp16 (the GPU
  profile's dtype): fp16 NaNs (AdamW's eps rounds to 0 in fp16) and dtype errors fail here;
- device: lesson code run under the rehearsal's stand-in GPU (labkit.rehearsal.GPU = cpu:1, fake tensors),
  which refuses ops that mix it with CPU tensors exactly as CUDA does; the cells are taken from the
  notebooks themselves, so an edit that brings a mix back fails here;
- machine: CUDA queries (capability, device name) patched to a T4's, for branches that depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from labkit import distill, evaluate, kernels, lora, lowrank, models, profiles, prune, quant, results, walk
from labkit.course import lessons
from labkit.prune.llm_pruner import taylor_importance
from labkit.rehearsal import harness
from labkit.rehearsal.harness import GPU, HOST, rehearse

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


# --- helpers --------------------------------------------------------------------------------------


# On CPU the GPU profile's dtype; where CUDA is present (benchmarks/gpu_check.sh), also on real CUDA tensors.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def tiny16(request):
    """tiny-llama-random in fp16, the GPU profile's dtype, on each of DEVICES (the inputs stay on CPU, as in
    the lessons: labkit moves them to the model's device)."""
    return models.load("tiny-llama-random", device=request.param, dtype=torch.float16)[0]


def tokens(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def cell(lesson: str, needle: str) -> str:
    """The source of the one code cell of lesson `lesson` (e.g. "08" or "05b") that contains `needle`."""
    (path,) = lessons(NOTEBOOKS, [lesson])
    cells = json.loads(path.read_text())["cells"]
    found = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and needle in "".join(c["source"])]
    assert len(found) == 1, f"lesson {lesson}: {len(found)} code cells contain {needle!r}"
    return found[0]


def run_cell(source: str, namespace: dict) -> str:
    """exec a cell's source in `namespace`; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<cell>", "exec"), namespace)
    return out.getvalue()


def small_config(num_layers: int, dtype=torch.float16) -> LlamaConfig:
    """tiny-llama-random's shapes with `num_layers` layers (lessons index layers up to 28), for fake models."""
    config = models.tiny_llama_random(num_layers=2)[0].config.to_dict()
    config.update(num_hidden_layers=num_layers, dtype=dtype)
    return LlamaConfig(**config)


class _Plot:
    """matplotlib stand-in: every call returns another _Plot, and any tensor handed to it must be in CPU
    memory (matplotlib reads tensors through numpy, which a CUDA tensor refuses)."""

    def __call__(self, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                assert value.device == HOST, f"a tensor on {value.device} given to matplotlib"
        return _Plot()

    def __getattr__(self, name):
        if name == "subplots":
            return lambda *args, **kwargs: (_Plot(), _Plot())
        return _Plot()

    def __iter__(self):
        return iter([_Plot() for _ in range(4)])

    def __getitem__(self, index):
        return _Plot()


# --- fp16 training: fp32 master weights --------------------------------------------------------------


def test_finetune_and_lora_in_fp16_stay_finite_and_learn(tiny16):
    data = tokens()
    start = copy.deepcopy(tiny16)
    curve = distill.finetune(tiny16, data, 3, lr=1e-3, progress=False)
    assert all(math.isfinite(v) for v in curve) and all_finite(tiny16)
    assert all(p.dtype == torch.float16 for p in tiny16.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(start.parameters(), tiny16.parameters())]
    assert all(moved), "an fp16 weight did not move: updates of ~lr are below fp16's resolution without fp32 masters"
    report = lora.lora_recover(start, data, steps=3, lr=1e-3)
    assert all(math.isfinite(v) for v in report["loss"]) and all_finite(start)
    assert report["loss"][-1] < report["loss"][0]


def test_distill_and_blockwise_distill_in_fp16_stay_finite(tiny16):
    data = tokens()
    teacher = models.tiny_llama_random(seed=1)[0].half()
    curve = distill.distill(tiny16, teacher, data, 3, lr=1e-3, alpha_ce=0.5, progress=False)
    assert all(math.isfinite(v) for v in curve) and all_finite(tiny16)
    curve = distill.distill(tiny16, teacher, data[:, :12], 2, lr=1e-3, on_policy=True, progress=False)  # GKD samples
    assert all(math.isfinite(v) for v in curve) and all_finite(tiny16)
    inputs, kwargs = walk.layer_inputs(teacher, data, 1)
    student = copy.deepcopy(teacher.model.layers[0])
    curve = distill.blockwise_distill(
        student, teacher.model.layers[1], inputs, 3, lr=1e-3, layer_kwargs=kwargs, progress=False
    )
    assert all(math.isfinite(v) for v in curve) and all_finite(student)
    assert curve[-1] < curve[0]


def test_students_train_through_the_gpu_profiles_adapters_in_fp16(tiny16):
    """The GPU profile trains lesson 07's and 12's students through LoRA adapters (profiles.Profile.lora_rank),
    8 windows per step in micro-batches: in fp16 the adapters' fp32 masters keep the losses finite, the student
    learns, and after the block it is a plain fp16 model again."""
    rank = profiles.PROFILES["gpu"].lora_rank
    assert isinstance(rank, int) and rank >= 1
    data = tokens()
    teacher = models.tiny_llama_random(seed=1)[0].half().to(tiny16.device)
    with lora.adapters(tiny16, rank):
        ft = distill.finetune(tiny16, data, 3, lr=1e-2, batch_size=2, grad_accum=4, progress=False)
        kd = distill.distill(tiny16, teacher, data, 3, lr=1e-2, batch_size=2, grad_accum=4, progress=False)
    for curve in (ft, kd):
        assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0]
    assert all_finite(tiny16) and all(p.dtype == torch.float16 for p in tiny16.parameters())
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny16.modules())
    inputs, kwargs = walk.layer_inputs(teacher, data, 0)
    targets, _ = walk.layer_inputs(teacher, data, 1)
    layer = tiny16.model.layers[0]
    with lora.adapters(layer, rank):
        curve = distill.blockwise_distill(layer, None, inputs, 3, lr=1e-2, layer_kwargs=kwargs, targets=targets)
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0] and all_finite(layer)


def test_micro_batches_see_the_same_windows_as_one_batch():
    """Lessons 07 and 12 split each step's 8 windows into micro-batches on the GPU profile (grad_accum): every
    step still sees the same windows, so the token budget and order are the CPU profile's."""
    data = torch.arange(48).view(24, 2)
    whole = distill.batches(data, 8, torch.Generator().manual_seed(0))
    micro = distill.batches(data, 2, torch.Generator().manual_seed(0))
    for _ in range(6):  # two epochs
        step = next(whole)
        assert torch.equal(torch.cat([next(micro) for _ in range(4)]), step)


def test_training_fp32_parameters_is_not_copied(tiny):
    """The CPU profile (fp32) trains its parameters themselves: no master copy, results as before."""
    p16 = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    assert distill.trainer._master_weight(p16).dtype == torch.float32
    assert all(distill.trainer._master_weight(p) is p for p in tiny.parameters())


def test_taylor_importance_in_fp16_matches_fp32(tiny):
    data = tokens(4)
    ref = taylor_importance(tiny, data, layers=[0, 1])
    half = taylor_importance(tiny.half(), data, layers=[0, 1])
    for i in (0, 1):
        for r, h in zip(ref[i], half[i]):
            assert h.dtype == torch.float32 and torch.isfinite(h).all()
            torch.testing.assert_close(h, r, rtol=0.05, atol=1e-3 * r.abs().max().item())  # fp16 forward/backward


# --- each track's walk-based methods on the fp16 model ------------------------------------------------


@pytest.mark.parametrize(
    "method",
    ["wanda", "sparsegpt", "flap", "llm_pruner", "gptq", "rtn", "smoothquant", "llm_int8", "svd-llm"],
)
def test_method_on_fp16_model_gives_finite_perplexity(tiny16, method):
    calib, test = tokens(4), tokens(1, 256, seed=1)
    run = {
        "wanda": lambda m: prune.wanda(m, calib, 0.5),
        "sparsegpt": lambda m: prune.sparsegpt(m, calib, None, "2:4"),
        "flap": lambda m: prune.flap(m, calib, 0.2),
        "llm_pruner": lambda m: prune.llm_pruner(m, calib, 0.2, layers=[0, 1]),
        "gptq": lambda m: quant.gptq(m, calib, 4, group_size=32),
        "rtn": lambda m: quant.rtn(m, 4, group_size=32),
        "smoothquant": lambda m: quant.smoothquant(m, calib),
        "llm_int8": lambda m: quant.llm_int8(m, calibration=calib),
        "svd-llm": lambda m: lowrank.svd(m, param_ratio=0.8, activation_aware=True, calibration=calib),
    }[method]
    run(tiny16)
    ppl = evaluate.perplexity(tiny16, test, 64, progress=False)
    assert math.isfinite(ppl) and ppl > 1
    with torch.no_grad():
        logits = tiny16(test[:, :16].to(tiny16.device)).logits
        assert logits.dtype == torch.float16  # still computes in the profile's dtype


# --- device mixes, under the stand-in GPU ----------------------------------------------------------------


def test_stand_in_gpu_refuses_a_cpu_cuda_mix():
    """The check below is only as good as this: an op mixing the stand-in GPU and the CPU raises."""

    def plan(r):
        (torch.randn(4, 4) * torch.ones(4, 4, device=GPU).std()).sum()

    with pytest.raises(RuntimeError, match="device"):
        rehearse(plan)


def test_lesson04_grid_comparison_runs_on_the_gpu():
    source = cell("04", "gauss = torch.randn(w.shape")

    def plan(r):
        w = torch.randn(64, 128, device=GPU, dtype=torch.float16)
        rel_error = lambda a, b: ((a - b).float().pow(2).sum() / a.float().pow(2).sum()).item()
        run_cell(source, {"torch": torch, "quant": quant, "w": w, "rel_error": rel_error})

    rehearse(plan)


def test_lesson08_rank_curve_uses_the_models_shapes_on_its_device():
    source = cell("08", "relative error against rank")
    profile = harness.profile("gpu")
    namespace = {"torch": torch, "walk": walk, "lowrank": lowrank, "plt": _Plot(), "P": profile}

    def plan(r):
        r.assume("info == 0", True)  # the Cholesky factorization succeeds
        namespace["model"] = harness.llama_7b(GPU, config=small_config(30))
        namespace["calib"] = harness.tokens(8, profile.seqlen, vocab=256)
        with r.phase("cell"):
            run_cell(source, namespace)

    report = rehearse(plan)
    out_f, in_f = 64, 160  # tiny-llama-random's down_proj
    assert max(namespace["ranks"]) <= min(out_f, in_f), "ranks beyond the matrix's rank: shapes hard-coded"
    assert namespace["r20"] == lowrank.rank_for_ratio(in_f, out_f, 0.8)
    # the maths stay on the GPU: besides the calibration tokens (int64), no host copy of H [in, in] or W
    # (the cell used to make fp64 CPU copies of both: 11008 x 11008 on LLaMA-7B)
    host_in_cell = report.phases["cell"][1] - namespace["calib"].numel() * 8
    assert host_in_cell < in_f * in_f * 4, report.summary()


def test_lesson08_explore_cell_plots_from_cpu_memory():
    source = cell("08", "import ipywidgets as widgets")
    widgets = type("widgets", (), {"interact": staticmethod(lambda *a, **k: None), "IntSlider": _Plot()})
    source = source.replace("import ipywidgets as widgets\n", "")

    def plan(r):
        model = harness.llama_7b(GPU, dtype=torch.float32, config=small_config(16, torch.float32))
        W15 = model.model.layers[15].self_attn.o_proj.weight.detach().float().clone()  # as section 4 keeps it
        run_cell(source, {"torch": torch, "lowrank": lowrank, "plt": _Plot(), "widgets": widgets, "W15": W15})

    rehearse(plan)


def test_lesson10_triton_examples_put_their_tensors_where_triton_runs():
    """On a GPU Triton compiles for CUDA (no interpreter): a backend="triton" call on CPU tensors raises.
    Every such lesson call must take tensors made on or moved to kernels.triton_device()."""
    assert kernels.triton_device() == torch.device("cpu" if kernels.triton_interpreted() else "cuda")
    for lesson in ("09", "10"):
        (path,) = lessons(NOTEBOOKS, [lesson])
        for index, c in enumerate(json.loads(path.read_text())["cells"]):
            source = "".join(c["source"])
            if c["cell_type"] != "code" or 'backend="triton"' not in source or "torch.cuda.is_available()" in source:
                continue
            moved = re.search(r"TRITON_DEVICE|triton_device\(\)|\.to\(device\)", source)
            assert moved, f"lesson {lesson} cell {index}: backend='triton' on tensors left on the CPU"


def test_lesson10_triton_examples_run_on_triton_device(monkeypatch):
    """Cell 18's example, run with TRITON_DEVICE = what a GPU machine would give: its tensors are there."""
    source = cell("10", 'kernels.rms_norm(x_small, w_small, 1e-6, residual=r_small, backend="triton")')
    seen = []

    def rms_norm(x, w, eps, residual=None, backend="auto"):
        seen.extend(t.device for t in (x, w, residual))
        return kernels.rms_norm_torch(x, w, eps, residual)

    fake_kernels = type("kernels", (), {"triton_device": staticmethod(lambda: GPU), "rms_norm": rms_norm})

    def plan(r):
        run_cell(source, {"torch": torch, "kernels": fake_kernels})

    rehearse(plan)
    assert seen == [GPU] * 3


def test_lesson07_training_cells_run_on_the_gpu_profile():
    """Lesson 07's fine-tuning, distillation and block-wise cells, as the notebook has them, with the GPU profile's
    settings (LoRA adapters, micro-batches) on small models on the stand-in GPU: a device mix or a setting the
    trainers refuse fails here."""
    import dataclasses
    import time
    import types

    from labkit.rehearsal.serving_and_training import _deepcopy

    sources = [cell("07", "curve_ft = distill.finetune"), cell("07", "curve_kd = distill.distill")]
    sources.append(cell("07", "distill.blockwise_distill"))
    profile = dataclasses.replace(harness.profile("gpu"), seqlen=64, sweep_windows=2)
    # copy.deepcopy of fake models: the plans' stand-in (a deep-copied fake tensor has storages of its own)
    fake_copy = types.SimpleNamespace(deepcopy=_deepcopy)
    namespace = {"copy": fake_copy, "time": time, "torch": torch, "lora": lora, "distill": distill}
    namespace["evaluate"] = evaluate
    namespace.update(P=profile, STEPS=2, BATCH=8, MICRO=2, SEQ=32, LR=5e-4, BLOCK_STEPS=2, ppl={})
    namespace["my_forward_kl"] = distill.forward_kl  # what the build-it cell gives while the learner's is a stub

    def plan(r):
        r.assume("if not torch.isfinite(norm)", True)
        teacher = harness.llama_7b(GPU, config=small_config(4))
        student0 = harness.llama_7b(GPU, config=small_config(2))
        student0.model.embed_tokens.weight.requires_grad_(False)
        namespace.update(teacher=teacher, student0=student0, keep=[0, 2], n_layers=4)
        namespace.update(train=harness.tokens(16, 32, vocab=256), test_ids=harness.tokens(1, 128, vocab=256))
        with torch.enable_grad():  # rehearse() runs plans without autograd; a notebook has it on
            for source in sources:
                run_cell(source, namespace)
        assert not any(isinstance(m, lora.LoRALinear) for m in namespace["student_kd"].modules())

    rehearse(plan)
    assert profile.lora_rank and set(namespace["ppl"]) == {
        "student, fine-tuned",
        "student, distilled",
        "student, block-wise",
    }


# --- CUDA machines without a feature ---------------------------------------------------------------------


def test_lesson02_skips_the_24_timing_on_a_t4(monkeypatch):
    source = cell("02", "semi_structured")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    namespace = {"torch": torch, "prune": prune, "evaluate": evaluate, "runs": {}}
    printed = run_cell(source, namespace)
    assert "Tesla T4 (compute capability 7.5): no sparse tensor cores" in printed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(prune, "semi_structured_speed", lambda: {"speedup": 1.5})
    assert "'speedup': 1.5" in run_cell(source, namespace)


def test_semi_structured_speed_names_the_missing_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5"):
        prune.semi_structured_speed()


# --- references the GPU profile does not have --------------------------------------------------------------


def test_every_reference_check_survives_the_gpu_profile():
    """A lesson that checks a key with no GPU-profile reference must pass missing_ok=True (or run that
    check on the CPU profile only), else the GPU run stops with a KeyError."""
    refs = results.references()
    call = re.compile(r'check_reference\(\s*"([^"]+)"')
    problems = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for index, c in enumerate(json.loads(path.read_text())["cells"]):
            source = "".join(c["source"])
            if c["cell_type"] != "code":
                continue
            for m in call.finditer(source):
                if "gpu" in refs.get(m.group(1), {}):
                    continue
                statement = source[m.start() : source.find("))", m.start())]
                before = source[: m.start()].splitlines()
                guarded = any('P.name == "cpu"' in line for line in before[-3:])
                if "missing_ok=True" not in statement and not guarded:
                    problems.append(f"{path.name} cell {index}: {m.group(1)}")
    assert not problems, problems


def test_missing_gpu_reference_is_reported_not_raised():
    key = "12/flap20-kd/perplexity"
    assert "gpu" not in results.references()[key]
    assert "no gpu-profile reference" in results.check_reference(key, 12.0, "gpu", missing_ok=True)


# --- the labkit pieces the lessons now call --------------------------------------------------------------------


def test_truncation_errors_match_fp64_maths():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    X = torch.randn(40, 200, generator=g) * torch.linspace(0.1, 3, 40)[:, None]
    H = X @ X.T / 200
    ranks = [1, 8, 24]
    curves = lowrank.truncation_errors(W.half(), H, ranks)  # fp16 weight: computed in fp32
    W64, H64 = W.half().double(), H.double()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    for i, r in enumerate(ranks):
        dW = W64 - U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        want = ((dW**2).sum() / (W64**2).sum()).item(), (torch.trace(dW @ H64 @ dW.T) / torch.trace(W64 @ H64 @ W64.T))
        assert curves["plain SVD: weight error"][i] == pytest.approx(want[0], rel=1e-4, abs=1e-7)  # fp32 SVD
        assert curves["plain SVD: output error"][i] == pytest.approx(want[1].item(), rel=1e-4, abs=1e-7)
    assert curves["SVD-LLM: output error"][-1] == pytest.approx(0.0, abs=1e-10)  # full rank: nothing discarded
    with pytest.raises(ValueError, match=r"ranks=\[0\]: need a non-empty list of integers in \[1, 24\]"):
        lowrank.truncation_errors(W, H, [0])


def test_semi_structured_unavailable_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert prune.semi_structured_unavailable().startswith("CPU: no sparse tensor cores")
