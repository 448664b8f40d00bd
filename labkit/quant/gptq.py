"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), Algorithm 1, on the shared calibration walk.

Per linear layer, minimise the layer-wise error  ‖W X − Ŵ X‖²  (eq. 1), X the calibration inputs.
Its Hessian with respect to each row of W is H = 2 X Xᵀ (walk.Hessian). Quantizing input column q of
all rows at once, the optimal update of the not-yet-quantized columns F is (eq. 2, OBQ):
    δ_F = − (w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}
GPTQ's three changes make this fast and stable:
    1. a fixed column order for all rows (left to right, or by decreasing diag(H) with act-order);
    2. lazy batch updates: columns are processed in blocks of B = 128; inside a block updates are
       applied at once to the block, and to the rest of W only when the block is done (fewer, larger
       matmuls);
    3. Cholesky reformulation: every H_F⁻¹ needed is a row of the upper Cholesky factor of H⁻¹, with
       H dampened by λ = percdamp · mean(diag H) for numerical stability.
The core loop below follows the reference implementation (github.com/IST-DASLab/gptq, gptq.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import walk
from ..threads import num_threads
from ..transform import all_or_nothing, check_count, check_damping, check_model, record, replace_data
from .formats import check_bits, check_group_size, check_weight, find_params, group_index, quantize_codes, round_to_grid
from .qlinear import QuantLinear, QuantReport, check_model_settings, set_module


@dataclass
class GPTQResult:
    """GPTQ's result for one weight matrix W [out, in]."""

    weight: torch.Tensor  # [out, in] in W's dtype: the dequantized weights
    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, n_groups] fp32 (1 group per channel, else in / group_size)
    zeros: torch.Tensor  # [out, n_groups] fp32
    g_idx: torch.Tensor  # [in] int32: the group of each input column (act-order: in processing order, not sorted)
    loss: float  # the loss estimate Σ_q (w_q − quant(w_q))² / (2 [H_F⁻¹]_qq), summed over rows


@torch.no_grad()
def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    sym: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    float_offset: bool = False,
    keep_zeros: bool = False,
    threads: int | None = 1,
    quantize_block=None,
) -> GPTQResult:
    """GPTQ on one weight matrix: a GPTQResult (weight, codes, scales, zeros, g_idx, loss).

    W: [out, in]; H: [in, in], the Hessian 2/n · X Xᵀ of the layer's inputs (walk.Hessian.H).
    keep_zeros: weights that are exactly 0 (pruned, e.g. by SparseGPT 2:4) stay exactly 0 (SparseGPT's
    joint sparsify-and-quantize), and their columns' errors are compensated like any other.
    threads: CPU threads torch uses while W (on the CPU) is quantized, restored afterwards
    (labkit.threads.num_threads); None leaves torch's setting. Default 1: the column loop's operations
    are tiny (one column; a rank-1 update of one block), so splitting each across threads costs more in
    synchronisation than it gains, and when the cores are shared with other processes every split waits
    for a descheduled thread, which makes the loop many times slower. The few larger operations
    (Cholesky, the lazy batch update) are small enough at these sizes that one thread loses little on
    them, and one thread gives the same bits whatever the number of cores.
    quantize_block: None (labkit's loop) or your own quantize_block(W1, Hinv1, quantize) -> (Q1, Err1, Losses1),
    Alg. 1's inner loop over one block (lesson 05's "build it"; see labkit.walk.obs_block for the contract). It needs
    group_size None or a divisor of blocksize, so that every group's grid comes from columns of one block.
    """
    with num_threads(threads if W.device.type == "cpu" else None):
        return _gptq(
            W,
            H,
            bits,
            group_size,
            sym=sym,
            act_order=act_order,
            blocksize=blocksize,
            percdamp=percdamp,
            float_offset=float_offset,
            keep_zeros=keep_zeros,
            quantize_block=quantize_block,
        )


class GroupGrids:
    """The grids of one matrix's groups, made as GPTQ enters each group (for a learner's quantize_block)."""

    def __init__(self, bits, group_size, sym, float_offset, pruned, scale=None, zero=None):
        self.bits, self.group_size, self.sym, self.float_offset, self.pruned = (
            bits,
            group_size,
            sym,
            float_offset,
            pruned,
        )
        self.scale, self.zero, self.scales, self.zeros = scale, zero, [], []

    def column(self, start: int):
        """quantize(i, block) for the block that starts at column `start`."""

        @walk.in_turn
        def quantize(i, block):  # block: [rows, B] as updated so far
            if self.group_size is not None and (start + i) % self.group_size == 0:  # entering a group: its grid
                self.scale, self.zero = find_params(
                    block[:, i : i + self.group_size], self.bits, self.sym, self.float_offset
                )
                self.scales.append(self.scale)
                self.zeros.append(self.zero)
            q = round_to_grid(block[:, i], self.scale, self.zero, self.bits, self.float_offset)
            return q if self.pruned is None else torch.where(self.pruned[:, start + i], 0.0, q)

        return quantize


def _gptq(
    W, H, bits, group_size, *, sym, act_order, blocksize, percdamp, float_offset, keep_zeros, quantize_block=None
) -> GPTQResult:  # W: [out, in]; H: [in, in]
    check_bits(bits)
    if keep_zeros and float_offset:
        raise ValueError(
            "keep_zeros=True needs an integer zero point (float_offset=False): only then is 0 exactly on the grid."
        )
    check_weight(W, "W")
    columns = W.shape[1]
    group_size = check_group_size(group_size, columns)
    if H.shape != (columns, columns) or not torch.isfinite(H).all():
        raise ValueError(
            f"H must be a finite [{columns}, {columns}] matrix (in_features of W); "
            f"got {tuple(H.shape)}{'' if torch.isfinite(H).all() else ' with non-finite values'}."
        )
    if blocksize < 1 or not percdamp >= 0:
        raise ValueError(f"blocksize={blocksize} must be positive and percdamp={percdamp} non-negative.")
    if quantize_block is not None and (not callable(quantize_block) or (group_size and blocksize % group_size)):
        raise ValueError(
            f"quantize_block={quantize_block!r}: pass a function quantize_block(W1, Hinv1, quantize), with "
            f"group_size None or a divisor of blocksize={blocksize} (got group_size={group_size})."
        )
    dtype = W.dtype
    W = W.float().clone()
    H = H.to(W.device, torch.float32)
    pruned = W == 0 if keep_zeros else None  # [out, in]: positions that must stay exactly 0

    diag = torch.diag(H).clone()
    dead = diag == 0  # inputs that are always 0: any weight works there; quantize it as 0
    diag[dead] = 1  # (inverse_hessian_cholesky gives them H_jj = 1)
    W[:, dead] = 0
    if group_size is None:  # one grid per row, from the whole (original) row
        scale, zero = find_params(W, bits, sym, float_offset)

    perm = None
    if act_order:  # "act-order": quantize columns with large activations first, while many remain to fix
        perm = torch.argsort(diag, descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if pruned is not None:
            pruned = pruned[:, perm]

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scales, zeros = [], []

    # H + λI with λ = percdamp · mean(diag H) (sec. 4, step 3), then Alg. 1: H⁻¹ ← Cholesky(H⁻¹)ᵀ, the upper
    # factor; its row j holds what eq. 2 needs at column j
    Hinv, _ = walk.inverse_hessian_cholesky(H, percdamp)

    grids = GroupGrids(bits, group_size, sym, float_offset, pruned, *((scale, zero) if group_size is None else ()))
    for i1 in range(0, columns, blocksize):  # Alg. 1: for i = 0, B, 2B, ... (step 2: lazy batches)
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        if quantize_block is not None:  # the learner's inner loop, on a copy of the block
            quantize = grids.column(i1)
            Q1, Err1, Losses1 = walk.checked_block(
                quantize_block(W1, Hinv[i1:i2, i1:i2].clone(), quantize), W1, "quantize_block", quantize
            )
            Q[:, i1:i2], Losses[:, i1:i2] = Q1, Losses1 / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
            continue
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):  # Alg. 1: for j = i, ..., i + B − 1
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size is not None and (i1 + i) % group_size == 0:
                # Entering a new group: its grid from its weights as updated so far. (The reference
                # reads W here, which misses this block's updates for a group that starts inside a
                # block; W1 has them. With group_size == blocksize the two are the same.) Columns of
                # the group beyond this block have not yet received the lazy update of this block's
                # columns i1 .. i1+i−1: add it here, so the grid does not depend on blocksize.
                end = i1 + i + group_size
                if end <= i2:
                    cols = W1[:, i : i + group_size]
                else:
                    pending = Err1[:, :i].matmul(Hinv[i1 : i1 + i, i2:end])  # [rows, end − i2]
                    cols = torch.cat([W1[:, i:], W[:, i2:end] - pending], 1)
                scale, zero = find_params(cols, bits, sym, float_offset)
                scales.append(scale)
                zeros.append(zero)
            q = round_to_grid(w, scale, zero, bits, float_offset)  # Alg. 1: Q_{:,j} ← quant(W_{:,j})
            if pruned is not None:  # the integer zero point is the grid's exact 0
                q = torch.where(pruned[:, i1 + i], 0.0, q)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d  # Alg. 1: E_{:,j−i} ← (W_{:,j} − Q_{:,j}) / [H⁻¹]_jj
            # Alg. 1: W_{:,j:(i+B)} −= E_{:,j−i} · H⁻¹_{j,j:(i+B)}  (eq. 2's update, inside the block)
            W1[:, i:] -= err1[:, None].matmul(Hinv1[i, i:][None, :])
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        # Alg. 1, lazy batch update of everything after the block: W_{:,(i+B):} −= E · H⁻¹_{i:(i+B),(i+B):}
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if quantize_block is not None:
        scales, zeros = grids.scales, grids.zeros
    if group_size is None:
        scales, zeros = [scale], [zero]
    scales, zeros = torch.stack(scales, 1), torch.stack(zeros, 1)
    g_idx = group_index(columns, group_size, W.device)  # in processing order
    # Q lies on the grid, so quantizing it again returns the codes it came from exactly (|Q / scale| ≤ 255:
    # fp32 round-off is far below the 0.5 that would move a code); one vectorized pass instead of one per column
    codes = quantize_codes(Q, scales[:, g_idx], zeros[:, g_idx], bits, float_offset)
    if perm is not None:  # undo the permutation: back to the original column order
        invperm = torch.argsort(perm)
        Q, codes, g_idx = Q[:, invperm], codes[:, invperm], g_idx[invperm]
    return GPTQResult(Q.to(dtype), codes, scales, zeros, g_idx, Losses.sum().item())


@torch.no_grad()
@all_or_nothing
def gptq(
    model,
    calibration: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    pack: bool = True,
    float_offset: bool = False,
    true_sequential: bool = True,
    device=None,
    batch_size: int = 8,
    keep_zeros: bool = False,
    *,
    threads: int | None = 1,
    quantize_block=None,
) -> QuantReport:
    """GPTQ on every decoder linear of `model`, in place, layer by layer (labkit.walk.calibration_walk).

    quantize_block: None (labkit's loop) or your own Alg. 1 inner loop over one block (lesson 05's "build it"),
    with labkit.walk.obs_block's contract; it needs group_size None or a divisor of blocksize. An answer of the wrong
    shape raises ValueError, the model unchanged.

    keep_zeros: weights already 0 (a pruned model) stay 0, so e.g. a 2:4 pattern survives quantization.
    threads: CPU threads while each weight is quantized (see gptq_quantize_weight); None leaves torch's setting.

    calibration: LongTensor [n_samples, seqlen] (labkit.data.calibration). pack=True installs QuantLinear
    modules; pack=False writes the dequantized weights back into the nn.Linear modules.
    true_sequential: quantize q/k/v, then o, then gate/up, then down (walk.SEQUENTIAL_GROUPS), each on the
    inputs that the already-quantized ones produce (the GPTQ code's default). Returns a QuantReport whose `errors`
    hold each linear's GPTQ loss estimate Σ_q (w_q − quant(w_q))² / (2 [H_F⁻¹]_qq), summed over rows.
    """
    check_model(model, "quant.gptq")
    group_size = check_model_settings(model, bits, group_size)
    if keep_zeros and float_offset:
        raise ValueError(
            "keep_zeros=True needs an integer zero point (float_offset=False): only then is 0 exactly on the grid."
        )
    check_count(blocksize, "blocksize", 128)
    check_damping(percdamp)
    walk.check_calibration(calibration, model)
    check_count(batch_size, "batch_size")
    report = QuantReport("GPTQ", bits, group_size, sym, float_offset, act_order, packed=pack)
    start = time.perf_counter()

    def make_stats(name, linear):
        return walk.Hessian(linear.in_features, device=linear.weight.device)

    def update(index, layer, stats):
        for name, hessian in stats.items():
            linear = layer.get_submodule(name)
            if not torch.isfinite(hessian.xtx).all():
                raise ValueError(
                    f"the calibration activations entering layers.{index}.{name} hold non-finite values "
                    f"(NaN or inf): GPTQ needs finite inputs. Check the model in float first (its "
                    f"perplexity); the model is left unchanged."
                )
            result = gptq_quantize_weight(
                linear.weight.data,
                hessian.H,
                bits,
                group_size,
                sym=sym,
                act_order=act_order,
                blocksize=blocksize,
                percdamp=percdamp,
                float_offset=float_offset,
                keep_zeros=keep_zeros,
                threads=threads,
                quantize_block=quantize_block,
            )
            if pack:
                packed = QuantLinear.replacing(
                    linear,
                    result.codes,
                    result.scales,
                    result.zeros,
                    bits,
                    group_size,
                    sym=sym,
                    float_offset=float_offset,
                    g_idx=result.g_idx,
                )
                set_module(layer, name, packed)
            else:
                replace_data(linear.weight, result.weight)
            report.errors[f"layers.{index}.{name}"] = result.loss
            report.layers += 1
            report.params += result.codes.numel()

    walk.calibration_walk(
        model,
        calibration,
        make_stats,
        update,
        device=device,
        batch_size=batch_size,
        sequential=walk.SEQUENTIAL_GROUPS if true_sequential else None,
        desc="GPTQ",
    )
    report.seconds = time.perf_counter() - start
    record(model, "GPTQ", report.setting + (" keep-zeros" if keep_zeros else ""), "quantize")
    return report
