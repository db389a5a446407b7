"""The DARTS architecture step: gradients of the validation loss with respect to the architecture
parameters (Liu et al. 2019, section 2.3).

* First order (`first_order_arch_grads`): the gradient of L_val(w, alpha) at the current weights,
  treating w as independent of alpha.
* Second order (`unrolled_arch_grads`): the gradient of L_val(w', alpha) where w' is the weights after
  one (virtual) step of the weight optimizer on the training loss, w' = w - lr * d(w, alpha). By the
  chain rule it is dL_val/dalpha(w') - (d^2 L_train / dalpha dw) . (lr * dL_val/dw'(w')), and the
  second-derivative term is a Hessian-vector product approximated by central differences with
  w +- R v, R = 0.01 / |v| (the paper's equation 8).

The weights are never modified in place: the virtual step and the perturbed weights are passed to the
network with `torch.func.functional_call`, so they are exactly restored, and the gradients are written
only to the architecture parameters' `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from src.utils.errors import AutoclsError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# the finite-difference radius of the Hessian-vector product (relative to |v|), as in DARTS
HVP_RADIUS = 1e-2


def arch_optimizer(
    params: Iterable[nn.Parameter], lr: float = 3e-4, betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 1e-3
) -> torch.optim.Adam:
    """Adam for the architecture parameters with the DARTS settings (lr 3e-4, betas (0.5, 0.999),
    weight decay 1e-3)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def first_order_arch_grads(net: nn.Module, loss_fn: Loss, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Set the architecture parameters' `.grad` to dL_val/dalpha at the current weights; returns L_val.
    Only the architecture gradients are computed (no weight gradients are formed)."""
    arch = net.arch_parameters()
    loss = loss_fn(net(images), target)
    _set_grads(arch, torch.autograd.grad(loss, arch, allow_unused=True))
    return loss.detach()


def unrolled_arch_grads(
    net: nn.Module,
    loss_fn: Loss,
    train_batch: tuple[torch.Tensor, torch.Tensor],
    val_batch: tuple[torch.Tensor, torch.Tensor],
    weight_optimizer: torch.optim.Optimizer,
    radius: float = HVP_RADIUS,
) -> torch.Tensor:
    """Set the architecture parameters' `.grad` to the second-order (unrolled) DARTS gradient; returns
    the validation loss at the unrolled weights. `weight_optimizer` (SGD) defines the virtual step:
    its current lr, momentum buffers, weight decay and Nesterov setting, per parameter group."""
    names = {id(p): name for name, p in net.named_parameters()}
    arch = net.arch_parameters()
    weights = net.weight_parameters()
    keys = [names[id(p)] for p in weights]

    # 1. the virtual weight step on the training batch
    train_loss = loss_fn(net(train_batch[0]), train_batch[1])
    grads = torch.autograd.grad(train_loss, weights, allow_unused=True)
    unrolled, scales = sgd_lookahead(weight_optimizer, weights, grads)

    # 2. the validation loss at the unrolled weights: its direct alpha gradient and its weight gradient
    unrolled = [w.requires_grad_() for w in unrolled]
    val_loss = loss_fn(functional_call(net, dict(zip(keys, unrolled)), (val_batch[0],)), val_batch[1])
    grads = list(torch.autograd.grad(val_loss, [*arch, *unrolled], allow_unused=True))
    direct, dw = grads[: len(arch)], grads[len(arch) :]
    # dw'/dalpha = -scale * d^2 L_train / (dw dalpha), with each parameter's step scale (lr, x (1 + mu)
    # with Nesterov) folded into the vector of the Hessian-vector product
    vector = [torch.zeros_like(w) if g is None else g * s for w, g, s in zip(weights, dw, scales)]

    # 3. the mixed second derivative times the vector, by central differences
    implicit = _hessian_vector_product(net, loss_fn, train_batch, weights, keys, vector, radius)
    _set_grads(arch, [_zero_if_none(d, a) - h for d, h, a in zip(direct, implicit, arch)])
    return val_loss.detach()


def sgd_lookahead(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> tuple[list[torch.Tensor], list[float]]:
    """(w', scale) per parameter: the weights one SGD step ahead, computed as torch.optim.SGD would
    (weight decay, momentum buffer, dampening, Nesterov) without touching the optimizer, and the
    factor by which that step scales the gradient (lr, or lr x (1 + momentum) with Nesterov)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
    if not isinstance(optimizer, torch.optim.SGD):
        raise AutoclsError(
            f"Second-order DARTS unrolls an SGD step but the weight optimizer is {type(optimizer).__name__}; "
            "use optimizer=sgd or set model.second_order=false."
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    ahead, scales = [], []
    for p, g in zip(params, grads):
        group = group_of.get(id(p))
        if group is None:
            raise RuntimeError("a network weight is missing from the weight optimizer")
        lr, mu = group["lr"], group.get("momentum", 0.0)
        nesterov, dampening = group.get("nesterov", False), group.get("dampening", 0.0)
        step = (torch.zeros_like(p) if g is None else g.detach()) + group.get("weight_decay", 0.0) * p.detach()
        scale = lr
        if mu:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            # torch's SGD starts the buffer at the first gradient, undamped
            buf = step.clone() if buf is None else mu * buf + (1 - dampening) * step
            step = step + mu * buf if nesterov else buf
            scale = lr * (1 + mu) if nesterov else lr
        ahead.append(p.detach() - lr * step)
        scales.append(scale)
    return ahead, scales


def _hessian_vector_product(
    net: nn.Module,
    loss_fn: Loss,
    batch: tuple[torch.Tensor, torch.Tensor],
    weights: Sequence[nn.Parameter],
    keys: Sequence[str],
    vector: Sequence[torch.Tensor],
    radius: float,
) -> list[torch.Tensor]:
    """(d^2 L / dalpha dw) . v ~ (dL/dalpha(w + R v) - dL/dalpha(w - R v)) / 2R, R = radius / |v|."""
    arch = net.arch_parameters()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in vector]))
    r = radius / max(float(norm), 1e-12)
    grads = []
    for sign in (1.0, -1.0):
        shifted = {k: w.detach() + sign * r * v for k, w, v in zip(keys, weights, vector)}
        loss = loss_fn(functional_call(net, shifted, (batch[0],)), batch[1])
        grads.append(torch.autograd.grad(loss, arch, allow_unused=True))
    return [(_zero_if_none(gp, a) - _zero_if_none(gn, a)) / (2 * r) for gp, gn, a in zip(*grads, arch)]


def _zero_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _set_grads(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        g = _zero_if_none(g, p).detach()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
