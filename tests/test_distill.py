"""labkit.distill: losses on hand-made logits, the training loops and students on the tiny random Llama."""

import copy
import math

import pytest
import torch

from labkit import distill, evaluate, models, prune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def teacher(tiny):
    """The tiny model in the teacher's role (fresh for each test, like `tiny`)."""
    return tiny


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))


def kl_on(student, teacher, data):
    """Forward KL (τ = 1) of student vs teacher over all next-token positions of data."""
    with torch.no_grad():
        return distill.forward_kl(student(data).logits[:, :-1], teacher(data).logits[:, :-1]).item()


# --- losses on a 2-token vocabulary: p_S = (1/2, 1/2), p_T = (3/4, 1/4) -------------------------------

S = [[0.0, 0.0]]  # logits of p_S
T = [[math.log(3.0), 0.0]]  # logits of p_T


def test_losses_hand_computed():
    s, t = torch.tensor(S), torch.tensor(T)
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_T ‖ p_S) = 0.130812
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_S ‖ p_T) = 0.143841
    m = (0.625, 0.375)  # β = 1/2: m = (p_T + p_S) / 2
    kl_tm = 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    kl_sm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert distill.forward_kl(s, t).item() == pytest.approx(forward, rel=1e-5)
    assert distill.reverse_kl(s, t).item() == pytest.approx(reverse, rel=1e-5)
    assert distill.jsd(s, t, beta=0.5).item() == pytest.approx(0.5 * kl_tm + 0.5 * kl_sm, rel=1e-5)
    assert distill.jsd(s, t, beta=0.5).item() == pytest.approx(0.033822, abs=1e-6)
    h_s, h_t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert distill.hidden_mse(h_s, h_t).item() == pytest.approx(((1 + 4) / 2 + 4 / 2) / 2)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_pushes_student_towards_teacher(loss):
    s = torch.tensor(S, requires_grad=True)
    distill.LOSSES[loss](s, torch.tensor(T)).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # gradient descent raises the logit of the token the teacher prefers


def test_forward_kl_gradient_is_tau_times_prob_difference():
    s = torch.tensor(S, requires_grad=True)
    distill.forward_kl(s, torch.tensor(T), temperature=2.0).backward()
    p_s = torch.softmax(torch.tensor(S) / 2, -1)
    p_t = torch.softmax(torch.tensor(T) / 2, -1)
    torch.testing.assert_close(s.grad, 2.0 * (p_s - p_t))  # Hinton et al.: ∂(τ² KL)/∂z = τ (p_S − p_T)


def test_hidden_mse_gradient_sign():
    h = torch.tensor([[1.0, -1.0]], requires_grad=True)
    distill.hidden_mse(h, torch.zeros(1, 2)).backward()
    torch.testing.assert_close(h.grad, torch.tensor([[1.0, -1.0]]))  # 2 (h − t) / d


def test_divergence_of_a_distribution_with_itself_is_zero():
    p = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1)) * 3
    q = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2)) * 3
    for loss in (distill.forward_kl, distill.reverse_kl, distill.jsd):
        assert loss(p, p, temperature=1.5).item() == pytest.approx(0, abs=1e-6)
        assert loss(p, q).item() > 0.01
    assert distill.jsd(p, q).item() <= math.log(2)  # the symmetric JSD is bounded by log 2


def test_temperature_squared_scaling():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    for loss in (distill.forward_kl, distill.reverse_kl, distill.jsd):
        assert loss(s, t, temperature=4.0).item() == pytest.approx(16 * loss(s / 4, t / 4).item(), rel=1e-4)
    # High temperature: τ² KL tends to logit matching, (1 / 2V) Σ_v (d_v − mean d)², d = z_S − z_T (Hinton sec. 2.1)
    d = s - t
    matching = ((d - d.mean(-1, keepdim=True)) ** 2).mean(-1).mean() / 2
    assert distill.forward_kl(s, t, temperature=200.0).item() == pytest.approx(matching.item(), rel=2e-2)


def test_jsd_limits_are_the_two_kls():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    eps = 1e-4
    assert distill.jsd(s, t, beta=eps).item() / eps == pytest.approx(distill.forward_kl(s, t).item(), rel=1e-2)
    assert distill.jsd(s, t, beta=1 - eps).item() / eps == pytest.approx(distill.reverse_kl(s, t).item(), rel=1e-2)


def test_mask_averages_only_selected_tokens():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 10, generator=g), torch.randn(2, 6, 10, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3:] = True
    expected = distill.forward_kl(s[:, 3:], t[:, 3:], temperature=2.0)
    torch.testing.assert_close(distill.forward_kl(s, t, temperature=2.0, mask=mask), expected)


def test_loss_errors():
    s, t = torch.zeros(2, 5), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="temperature=0"):
        distill.forward_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        distill.jsd(s, t, temperature=-1.0)
    for beta in (0, 1, 1.5):
        with pytest.raises(ValueError, match=f"beta={beta}"):
            distill.jsd(s, t, beta=beta)
    with pytest.raises(ValueError, match=r"student logits have 5 .* teacher logits 7"):
        distill.reverse_kl(s, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="mask selects no tokens"):
        distill.forward_kl(s, t, mask=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden states differ"):
        distill.hidden_mse(torch.zeros(2, 4), torch.zeros(2, 8))


# --- students -------------------------------------------------------------------------------------------


def test_drop_layers_keeps_the_model_runnable(teacher, data):
    student = prune.drop_layers(teacher)  # every other layer: [0]
    assert len(student.model.layers) == 1 and student.config.num_hidden_layers == 1
    assert len(teacher.model.layers) == 2  # the teacher is untouched
    assert student(data).logits.shape == teacher(data).logits.shape
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    second = prune.drop_layers(teacher, keep=[1])
    assert second.model.layers[0].self_attn.layer_idx == 0  # renumbered for the KV cache
    out = second.generate(data[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    summary = distill.describe_student(second, teacher)
    assert summary.parameters == models.parameter_count(second)
    assert summary.weight_bytes == evaluate.weight_bytes(second)
    assert summary.parameter_ratio < 1 and "layers" in str(summary)


def test_drop_layers_errors(teacher):
    for keep in ([2], [1, 0], [0, 0], []):
        with pytest.raises(ValueError, match="increasing list of distinct layer indices"):
            prune.drop_layers(teacher, keep=keep)


def test_fresh_student_shares_vocabulary(teacher):
    student = distill.fresh_student(
        {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}, teacher=teacher
    )
    assert distill.vocab_size(student) == 256 and student.config.head_dim == 8
    with pytest.raises(ValueError, match="vocab_size=128, but the teacher's vocabulary has 256"):
        distill.fresh_student({"vocab_size": 128}, teacher=teacher)
    other = distill.fresh_student({"vocab_size": 128})
    with pytest.raises(ValueError, match="vocabulary mismatch: the student predicts 128 tokens and the teacher 256"):
        distill.distill(other, teacher, torch.zeros(2, 4, dtype=torch.long), steps=1, progress=False)


# --- training loops ------------------------------------------------------------------------------------


def test_distill_lowers_the_divergence_and_is_deterministic(teacher, data):
    student = prune.drop_layers(teacher, keep=[0])
    before = kl_on(student, teacher, data)
    teacher_state = copy.deepcopy(teacher.state_dict())
    curve = distill.distill(student, teacher, data, steps=8, lr=2e-3, batch_size=4, grad_accum=2, progress=False)
    assert len(curve) == 8 and all(math.isfinite(v) for v in curve)
    assert kl_on(student, teacher, data) < 0.7 * before
    assert not student.training and not teacher.training
    for name, value in teacher.state_dict().items():  # the teacher never changes
        torch.testing.assert_close(value, teacher_state[name])
    again = distill.distill(
        prune.drop_layers(teacher, keep=[0]),
        teacher,
        data,
        steps=8,
        lr=2e-3,
        batch_size=4,
        grad_accum=2,
        progress=False,
    )
    assert again == curve


def test_on_policy_distillation(teacher, data):
    student = prune.drop_layers(teacher, keep=[0])
    before = kl_on(student, teacher, data)
    curve = distill.distill(
        student,
        teacher,
        data,
        steps=6,
        loss="jsd",
        temperature=1.0,
        lr=2e-3,
        on_policy=True,
        prompt_len=8,
        progress=False,
    )
    assert len(curve) == 6 and kl_on(student, teacher, data) < before
    with pytest.raises(ValueError, match="alpha_ce > 0 with on_policy=True"):
        distill.distill(student, teacher, data, steps=1, on_policy=True, alpha_ce=0.5, progress=False)
    with pytest.raises(ValueError, match="prompt_len=24"):
        distill.distill(student, teacher, data, steps=1, on_policy=True, prompt_len=24, progress=False)


def test_sample_with_cache_matches_full_forward(teacher, data):
    prompts = data[:2, :6]
    greedy = distill.sample(teacher, prompts, 5, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    tokens = prompts
    for _ in range(5):  # argmax continuation, recomputing the whole sequence each time
        tokens = torch.cat([tokens, teacher(tokens).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, tokens)


def test_finetune_lowers_cross_entropy(teacher):
    pattern = (torch.arange(24)[None] + 7 * torch.arange(8)[:, None]) % 256  # next token = this one + 1
    student = prune.drop_layers(teacher, keep=[0])
    curve = distill.finetune(student, pattern, steps=10, lr=3e-3, progress=False)
    assert curve[-1] < 0.7 * curve[0]


def test_distill_argument_errors(teacher, data):
    student = prune.drop_layers(teacher, keep=[0])
    with pytest.raises(ValueError, match="loss='kl'"):
        distill.distill(student, teacher, data, steps=1, loss="kl", progress=False)
    with pytest.raises(ValueError, match="steps=0"):
        distill.distill(student, teacher, data, steps=0, progress=False)
    with pytest.raises(ValueError, match=r"data must be a LongTensor of token ids"):
        distill.finetune(student, data.float(), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"data holds 0 windows of 24 tokens"):  # not an endless wait for a batch
        distill.finetune(student, data[:0], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"data holds 8 windows of 1 tokens; need .* seqlen >= 2"):
        distill.distill(student, teacher, data[:, :1], steps=1, progress=False)
    with pytest.raises(ValueError, match="temperature=0"):
        distill.distill(student, teacher, data, steps=1, temperature=0, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=math.inf), r"temperature=inf: need a number in \[1e-06, 10000\]"),
        (dict(temperature=math.nan), r"temperature=nan"),
        (dict(loss="jsd", beta=math.nan), r"beta=nan"),
        (dict(beta=1.0), r"beta=1.0"),
        (dict(lr=math.inf), r"lr=inf: need a learning rate in \(0, 1\]"),
        (dict(lr=math.nan), r"lr=nan"),
        (dict(weight_decay=-0.1), r"weight_decay=-0.1: need a decay in \[0, 1\]"),
        (dict(weight_decay=math.inf), r"weight_decay=inf"),
        (dict(max_grad_norm=math.nan), r"max_grad_norm=nan: need a finite norm > 0, or None"),
        (dict(max_grad_norm="1"), r"max_grad_norm='1'"),
        (dict(alpha_ce=math.nan), r"alpha_ce=nan: need a weight in \[0, 1\]"),
        (dict(alpha_ce=1.5), r"alpha_ce=1.5"),
        (dict(seed=1.5), r"seed=1.5: need an integer >= 0"),
    ],
)
def test_distill_float_hyperparameters_are_finite_and_in_range(teacher, data, kwargs, match):
    student = prune.drop_layers(teacher, keep=[0])
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=match):
        distill.distill(student, teacher, data, steps=1, progress=False, **kwargs)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(weight_decay=math.nan), dict(max_grad_norm=0)])
def test_finetune_and_blockwise_check_their_floats(teacher, data, kwargs):
    name = next(iter(kwargs))
    student = prune.drop_layers(teacher, keep=[0])
    with pytest.raises(ValueError, match=f"{name}="):
        distill.finetune(student, data, steps=1, progress=False, **kwargs)
    inputs = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match=f"{name}="):
        distill.blockwise_distill(student.model.layers[0], None, inputs, 1, targets=inputs, progress=False, **kwargs)


def test_a_non_finite_loss_stops_before_the_update(teacher, data):
    """Step 2's loss is NaN: the error names the step, and the student keeps its weights after step 1."""
    calls = []

    def loss_nan_at_step_2(student_logits, teacher_logits, mask=None):
        calls.append(1)
        value = distill.forward_kl(student_logits, teacher_logits, 2.0, mask)
        return value * math.nan if len(calls) == 2 else value

    one_step = prune.drop_layers(teacher, keep=[0])
    distill.distill(one_step, teacher, data, steps=1, loss=loss_nan_at_step_2, progress=False)
    calls.clear()
    student = prune.drop_layers(teacher, keep=[0])
    with pytest.raises(
        FloatingPointError, match=r"training step 2 of 3: the loss is nan.*weights are those after step 1"
    ):
        distill.distill(student, teacher, data, steps=3, loss=loss_nan_at_step_2, progress=False)
    for name, value in student.state_dict().items():
        assert torch.equal(value, one_step.state_dict()[name]), name
    assert not student.training and all(p.grad is None for p in student.parameters())


def test_a_non_finite_gradient_stops_before_the_update(teacher, data):
    student = prune.drop_layers(teacher, keep=[0])
    before = copy.deepcopy(student.state_dict())
    student.lm_head.weight.register_hook(lambda grad: grad * math.inf)  # a finite loss, an infinite gradient
    with pytest.raises(FloatingPointError, match=r"training step 1 of 2: the gradient norm is (inf|nan)"):
        distill.finetune(student, data, steps=2, max_grad_norm=None, progress=False)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_blockwise_distill_repairs_a_perturbed_block(teacher, data):
    inputs, kwargs = distill.layer_inputs(teacher, data, 1)  # [8, 24, 64] and the rotary cos/sin
    assert inputs.shape == (8, 24, 64)
    block = copy.deepcopy(teacher.model.layers[1])
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    curve = distill.blockwise_distill(
        block, teacher.model.layers[1], inputs, steps=8, lr=1e-3, batch_size=3, layer_kwargs=kwargs, progress=False
    )
    with torch.no_grad():
        after = distill.hidden_mse(block(inputs, **kwargs), teacher.model.layers[1](inputs, **kwargs)).item()
    assert after < 0.5 * curve[0]


def test_layer_states_are_the_layer_boundaries(teacher, data):
    states, kwargs = distill.layer_states(teacher, data, batch_size=3)
    assert len(states) == 3 and all(s.shape == (8, 24, 64) for s in states)
    for index in (0, 1):
        inputs, _ = distill.layer_inputs(teacher, data, index)
        torch.testing.assert_close(states[index], inputs)
    with torch.no_grad():
        torch.testing.assert_close(states[2], teacher.model.layers[1](states[1], **kwargs))
        last = teacher.model.norm(states[2])  # the model's last hidden state is states[L] after the final norm
        torch.testing.assert_close(teacher.lm_head(last), teacher(data).logits, rtol=1e-4, atol=1e-4)


def test_block_influence_is_one_minus_cosine(teacher, data):
    bi = prune.block_influence(teacher, data)
    states, _ = distill.layer_states(teacher, data)
    assert len(bi) == 2
    cos = torch.nn.functional.cosine_similarity(states[1], states[2], dim=-1).mean().item()
    assert bi[1] == pytest.approx(1 - cos, abs=1e-6)
    identity = copy.deepcopy(teacher)
    with torch.no_grad():  # a layer whose attention and MLP add nothing leaves the stream unchanged: BI = 0
        identity.model.layers[1].self_attn.o_proj.weight.zero_()
        identity.model.layers[1].mlp.down_proj.weight.zero_()
    assert prune.block_influence(identity, data)[1] == pytest.approx(0, abs=1e-6)


def test_blockwise_distill_replaces_a_span(teacher, data):
    """A student layer learns to do what two teacher layers did (the targets come from layer_states)."""
    states, kwargs = distill.layer_states(teacher, data)
    block = copy.deepcopy(teacher.model.layers[0])
    with torch.no_grad():
        before = distill.hidden_mse(block(states[0], **kwargs), states[2]).item()
    curve = distill.blockwise_distill(
        block, None, states[0], steps=10, lr=2e-3, batch_size=4, layer_kwargs=kwargs, targets=states[2], progress=False
    )
    with torch.no_grad():
        after = distill.hidden_mse(block(states[0], **kwargs), states[2]).item()
    assert curve[0] == pytest.approx(before, rel=0.5) and after < 0.7 * before
    with pytest.raises(ValueError, match="exactly one of teacher_layer"):
        distill.blockwise_distill(block, teacher.model.layers[1], states[0], steps=1, targets=states[2], progress=False)
    with pytest.raises(ValueError, match="exactly one of teacher_layer"):
        distill.blockwise_distill(block, None, states[0], steps=1, progress=False)
    with pytest.raises(ValueError, match="must have the inputs' shape"):
        distill.blockwise_distill(block, None, states[0], steps=1, targets=states[2][:2], progress=False)
