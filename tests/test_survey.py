"""The survey's published table, and the arithmetic the capstone reads out of it."""

import pytest

from labkit import survey

LLAMA_7B_PARAMS = 6_738_415_616  # huggyllama/llama-7b, counted from its config


def test_weight_memory_column_is_fp16_gibibytes():
    baseline = survey.PRUNING_LLAMA_7B[0]
    assert baseline[0] == "Baseline" and round(LLAMA_7B_PARAMS * 2 / 2**30, 2) == baseline[3] == 12.55


def test_baseline_runtime_memory_is_that_of_fp32_weights():
    # 26.16 GB of runtime memory cannot hold fp16 weights plus a small cache twice over; it is the
    # size of fp32 weights (25.1 GiB) plus activations: the capstone's first remark.
    rm = survey.PRUNING_LLAMA_7B[0][2]
    fp32 = LLAMA_7B_PARAMS * 4 / 2**30
    assert fp32 < rm < fp32 * 1.1
    pruned_20 = next(r for r in survey.PRUNING_LLAMA_7B if r[:2] == ("FLaP", "20%"))
    assert pruned_20[2] / pruned_20[3] < 1.05  # the pruned rows' runtime memory is fp16-sized


def test_engine_rows_share_one_gptq_perplexity():
    gptq4 = {ppl for m, _, _, _, _, ppl in survey.QUANTIZATION_LLAMA_2_7B if m == "GPTQ 4-bit"}
    assert gptq4 == {6.08}
    assert "Baseline" in survey.format_pruning() and "TensorRT-LLM" in survey.format_quantization()


def test_pruning_row_names_its_model_and_refuses_an_unknown_row():
    flap = survey.pruning_row("FLaP", "20%")
    assert (flap["rm_gb"], flap["wm_gb"], flap["perplexity"], flap["model"]) == (9.72, 9.44, 14.62, "LLaMA-7B")
    assert survey.pruning_row("Baseline", "-")["perplexity"] == 12.62
    with pytest.raises(ValueError, match=r"\('FLaP', '30%'\).*allowed: \('Baseline', '-'\)"):
        survey.pruning_row("FLaP", "30%")
