"""CSKDLoss against an independent plain-PyTorch composition (log_softmax + kl_div + cross_entropy)."""

import pytest
import torch
import torch.nn.functional as F

from timm_cskd import CSKDLoss, cskd_loss
from timm_cskd.loss import unfused_cskd_loss


def reference(logits, target, partner, temperature, lambda_cls, smoothing=0.0):
    z, v = logits.float(), partner.float().detach()
    ce = F.cross_entropy(z, target, label_smoothing=smoothing)
    kl = F.kl_div(F.log_softmax(z / temperature, 1), F.softmax(v / temperature, 1), reduction="batchmean")
    return ce + lambda_cls * temperature**2 * kl


def reference_symmetric(logits, target, temperature, lambda_cls):
    k = logits.shape[0] // 2
    partner = torch.cat([logits[k:], logits[:k]]).detach()
    return reference(logits, target, partner, temperature, lambda_cls)


TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-2), torch.float16: (1e-5, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("lambda_cls", [1.0, 3.0])
@pytest.mark.parametrize("shape", [(7, 5), (256, 1000)])
def test_value_and_grad_match_reference(dtype, temperature, lambda_cls, shape):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    partner = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],), generator=g)

    loss = CSKDLoss(temperature, lambda_cls)(logits, target, partner)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = logits.detach().float().requires_grad_()
    ref = reference(ref_logits, target, partner, temperature, lambda_cls)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_baseline_the_benchmarks_time_is_the_reference_composition(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 7, generator=g) * 3).to(dtype).requires_grad_()
    partner = (torch.randn(9, 7, generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 7, (9,), generator=g)

    loss = unfused_cskd_loss(logits, target, partner, temperature=2.0, lambda_cls=3.0)
    loss.backward()
    ref_logits = logits.detach().requires_grad_()
    ref = reference(ref_logits, target, partner.detach(), 2.0, 3.0)
    ref.backward()

    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert partner.grad is None


def test_partner_never_gets_gradient():
    logits = torch.randn(6, 4, requires_grad=True)
    partner = torch.randn(6, 4, requires_grad=True)
    loss = CSKDLoss()(logits, torch.arange(6) % 4, partner * 2)
    loss.backward()
    assert logits.grad is not None
    assert partner.grad is None


def test_gradcheck_float64():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    partner = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda z: cskd_loss(z, target, partner, temperature=4.0)[0], (logits,))
    assert torch.autograd.gradcheck(
        lambda z: cskd_loss(z, target, partner, temperature=2.0, lambda_cls=3.0, label_smoothing=0.1)[0],
        (logits,),
    )
    sym_target = torch.tensor([0, 5, 2, 0, 5, 2])
    sym_logits = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the partners too, so check the stop-gradient form against autograd instead.
    (grad,) = torch.autograd.grad(cskd_loss(sym_logits, sym_target, symmetric=True)[0], sym_logits)
    ref_logits = sym_logits.detach().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference_symmetric(ref_logits, sym_target, 4.0, 1.0), ref_logits)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_form_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 100, generator=g) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, 100, (32,), generator=g).repeat(2)
    loss = CSKDLoss(4.0, 1.0).forward_paired(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref = reference_symmetric(ref_logits, target, 4.0, 1.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=rtol, atol=atol)


def test_terms_are_reported_and_sum_to_total():
    logits, partner = torch.randn(8, 10), torch.randn(8, 10)
    target = torch.randint(0, 10, (8,))
    total, ce, kl = cskd_loss(logits, target, partner, temperature=4.0, lambda_cls=3.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target))
    ref_kl = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(partner / 4, 1), reduction="batchmean")
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(total, ce + 3.0 * 16 * kl)


def test_label_smoothing_and_soft_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 10, generator=g, requires_grad=True)
    partner = torch.randn(16, 10, generator=g)
    target = torch.randint(0, 10, (16,), generator=g)
    loss = CSKDLoss(label_smoothing=0.1)(logits, target, partner)
    torch.testing.assert_close(loss, reference(logits, target, partner, 4.0, 1.0, smoothing=0.1))

    soft = torch.softmax(torch.randn(16, 10, generator=g), 1)
    (grad,) = torch.autograd.grad(CSKDLoss(label_smoothing=0.1)(logits, soft, partner), logits)
    ref_logits = logits.detach().requires_grad_()
    kl = F.kl_div(F.log_softmax(ref_logits / 4, 1), F.softmax(partner / 4, 1), reduction="batchmean")
    ref = F.cross_entropy(ref_logits, soft, label_smoothing=0.1) + 16 * kl
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(grad, ref_grad)


def test_zero_probability_partner_classes_are_finite():
    logits = torch.randn(4, 5, requires_grad=True)
    partner = torch.tensor([[0.0, -float("inf"), 1.0, 2.0, 3.0]]).repeat(4, 1)
    loss = CSKDLoss()(logits, torch.zeros(4, dtype=torch.long), partner)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, reference(logits, torch.zeros(4, dtype=torch.long), partner, 4.0, 1.0))


def _saved_bytes(fn):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_no_more_memory_for_backward_than_unfused(dtype):
    logits = torch.randn(512, 1000).to(dtype).requires_grad_()
    partner = torch.randn(512, 1000).to(dtype)
    target = torch.randint(0, 1000, (512,))
    fused = _saved_bytes(lambda: CSKDLoss()(logits, target, partner))
    unfused = _saved_bytes(lambda: reference(logits, target, partner, 4.0, 1.0))
    assert fused == logits.numel() * logits.element_size()
    assert fused <= unfused


def test_float16_gradient_keeps_small_entries_under_loss_scaling():
    """Backward with GradScaler's 2^16: the float16 gradient is the float32 one scaled, then rounded."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(256, 1000, generator=g) * 4).half().requires_grad_()
    partner = (torch.randn(256, 1000, generator=g) * 4).half()
    target = torch.randint(0, 1000, (256,), generator=g)
    scale = 2.0**16
    (grad,) = torch.autograd.grad(CSKDLoss()(logits, target, partner) * scale, logits)
    ref_logits = logits.detach().float().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference(ref_logits, target, partner, 4.0, 1.0) * scale, ref_logits)
    assert grad.dtype == torch.float16
    nonzero = ref_grad.half() != 0
    assert (grad[nonzero] != 0).all(), "entries the scaled float16 gradient holds were flushed to zero"
    torch.testing.assert_close(grad.float(), ref_grad.half().float(), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "call", "message"),
    [
        ({"temperature": 0.0}, None, "temperature"),
        ({"temperature": -1.0}, None, "temperature"),
        ({"lambda_cls": -0.5}, None, "lambda_cls"),
        (
            {},
            lambda loss: loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.randn(4, 6)),
            "shape",
        ),
        (
            {},
            lambda loss: loss(torch.randn(4, 5), torch.zeros(3, dtype=torch.long), torch.randn(4, 5)),
            "target",
        ),
        (
            {},
            lambda loss: loss(torch.randn(4, 5), torch.tensor([0, 1, 5, 2]), torch.randn(4, 5)),
            "out of range",
        ),
        (
            {},
            lambda loss: loss(torch.randn(4, 5), torch.tensor([0, -1, 2, 2]), torch.randn(4, 5)),
            "out of range",
        ),
        ({}, lambda loss: loss.forward_paired(torch.randn(5, 5), torch.zeros(5, dtype=torch.long)), "even"),
    ],
)
def test_invalid_input_gets_clear_error(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        loss = CSKDLoss(**kwargs)
        call(loss)


def _scaler_scales(loss_fn, steps=6):
    """GradScaler's scale after each fp16-autocast step of a small classifier trained with ``loss_fn``."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**13, growth_interval=1)
    x, partner_x = torch.randn(2, 8, 16, generator=g)
    y = torch.arange(8) % 10
    scales = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
            with torch.no_grad():
                partner = model(partner_x)
            loss = loss_fn(logits, y, partner)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_grad_scaler_grows_past_2_16_as_with_plain_cross_entropy():
    fused = _scaler_scales(lambda z, y, p: CSKDLoss(4.0, 1.0)(z, y, p))
    plain = _scaler_scales(lambda z, y, p: F.cross_entropy(z.float(), y))
    assert plain[:4] == [2.0**14, 2.0**15, 2.0**16, 2.0**17], "plain CE grows past 2^16"
    assert fused == plain


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_values_are_float32_exact_under_bf16_autocast(symmetric, soft):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=g) * 3
    partner = None if symmetric else torch.randn(64, 100, generator=g) * 3
    target = (
        torch.softmax(torch.randn(64, 100, generator=g), 1)
        if soft
        else torch.randint(0, 100, (64,), generator=g)
    )
    exact = cskd_loss(logits, target, partner, symmetric=symmetric)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cskd_loss(logits, target, partner, symmetric=symmetric)
    for a, b in zip(autocast, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
