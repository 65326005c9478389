r"""Adam over many parameter groups in one multi-tensor pass.

The trainer gives every quantized site its own learning rate (a step relative to the site's
weight RMS), so a model of 210 sites has over 200 parameter groups. ``torch.optim.Adam``
steps group by group: with ``fused=True`` that is one kernel launch per group, and a launch
over one site's weight has too few blocks of work to fill a GPU. On an H200 the Adam update
of SmolLM2-135M (212 groups) took 15.9 ms of a 155 ms W2A2 training step (docs/qat.md,
twentieth session), where the bytes it moves (about 3 GB) need under 1 ms.

:class:`GroupedAdam` computes the same update with ``torch._foreach_*`` ops over the
parameters of all groups at once; each group's rate enters as one scalar per parameter.

Math (Adam without weight decay, for every parameter ``p`` with gradient ``g`` at step ``t``,
``r`` its group's rate times the schedule factor ``f``)::

    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    p <- p - r / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

which is ``torch.optim.Adam``'s update (tests/test_optim.py compares the two in float64).

Invariants:

* every parameter steps at every step (one without a gradient is refused), so all step
  counts are equal and the bias corrections are two scalars;
* a group's ``"lr"`` is its base rate and is never changed by the optimizer; the schedule
  multiplies every rate by one factor, :meth:`GroupedAdam.set_lr_factor` (with
  ``capturable=True`` a device tensor, so that a step captured in a CUDA graph reads the
  current value);
* the state of a parameter has ``torch.optim.Adam``'s keys (``step``, ``exp_avg``,
  ``exp_avg_sq``), so checkpoints of either optimizer load into the other.
"""
from __future__ import annotations

import torch


class GroupedAdam(torch.optim.Optimizer):
    """Adam (no weight decay, no amsgrad) whose groups step together; see the module docstring.

    ``params``: parameters or groups, each group with its ``lr``. ``capturable``: keep the step
    counts and the schedule factor on the parameters' device, so that :meth:`step` launches
    no host synchronisation and can be captured in a CUDA graph."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, capturable: bool = False):
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr})
        self.betas, self.eps, self.capturable = (float(betas[0]), float(betas[1])), float(eps), capturable
        for g in self.param_groups:
            if torch.is_tensor(g["lr"]):
                raise TypeError("GroupedAdam takes each group's lr as a float; schedule it with set_lr_factor")
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else None
        self._lr_factor = torch.ones((), device=device) if capturable else 1.0

    def set_lr_factor(self, factor: float) -> None:
        """Multiply every group's rate by ``factor`` from the next step on."""
        if torch.is_tensor(self._lr_factor):
            self._lr_factor.fill_(factor)
        else:
            self._lr_factor = float(factor)

    def lr_of(self, group: dict) -> float:
        """The rate ``group`` steps at now: its base rate times the schedule factor."""
        return float(group["lr"]) * float(self._lr_factor)

    def _state_of(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            dev = p.device if self.capturable else torch.device("cpu")
            st["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif self.capturable and st["step"].device != p.device:
            st["step"] = st["step"].to(p.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, exp_avgs, exp_avg_sqs, steps, rates = [], [], [], [], [], []
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.grad is None:
                    raise ValueError("GroupedAdam steps every parameter together: one has no gradient "
                                     f"(group {gi}, shape {tuple(p.shape)}, requires_grad={p.requires_grad}); "
                                     "give it only parameters that the loss reaches")
                if p.grad.is_sparse:
                    raise ValueError("GroupedAdam does not take sparse gradients")
                st = self._state_of(p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
                rates.append(float(g["lr"]))
        if not params:
            return loss
        beta1, beta2 = self.betas
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        t = steps[0]  # all equal: every parameter steps every time
        if self.capturable:
            step_size = self._lr_factor / (1.0 - torch.pow(beta1, t))
            bias2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt()
        else:
            n = float(t)
            step_size = self._lr_factor / (1.0 - beta1 ** n)
            bias2_sqrt = (1.0 - beta2 ** n) ** 0.5
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(exp_avgs, denom)
        del denom
        torch._foreach_mul_(update, step_size)
        torch._foreach_mul_(update, rates)
        torch._foreach_sub_(params, update)
        return loss
