"""Fig. 2b's shortcut-predicting baseline (not π-Flow): a student that predicts one velocity per step and is trained by
direct regression of the teacher ODE's NFE-step jumps. The toy (`--policy shortcut`) and the SiT attachment
(`sit.ShortcutDiT`) use it to compare with π-ID at the same budget (docs/toy-lab.md, docs/digits.md)."""
import torch

import piflow


class ShortcutPolicy:
    """The baseline as a policy: one velocity u held constant over the step, i.e. the
    straight jump x_dst = x_src + (sigma_dst - sigma_src) u. Trained by shortcut_loss, not by π-ID."""

    def __init__(self, u, x_src, sigma_src):
        self.u, self.x_src, self.sigma_src = u, x_src, piflow.as_batch(sigma_src, x_src)

    def velocity(self, x_t, sigma_t):
        return self.u

    def detach(self):
        return ShortcutPolicy(self.u.detach(), self.x_src, self.sigma_src)


def shortcut_loss(student, noise, cond, cfg, jump, backward):
    """The Fig. 2b baseline's loss (direct regression of shortcuts, §1 and §7): at each NFE step of the schedule,
    1/2 |u - (x_dst - x_src) / (sigma_dst - sigma_src)|^2 with x_dst = jump(x_src, i) the teacher ODE's endpoint of
    step i, weighted by the step's raw length as in Alg. 3; the walk follows the teacher's trajectory from noise.
    backward(loss) is called per step; returns the detached total."""
    taus, sigmas = piflow.nfe_schedule(cfg.nfe, cfg.shift, cfg.final_step_scale)
    x, total = noise, 0.0
    for i in range(cfg.nfe):
        s_src, s_dst = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            x_dst = jump(x, i)
        u = piflow.call(student, x, piflow.as_batch(s_src, x), cond).u
        loss = 0.5 * (u - (x_dst - x) / (s_dst - s_src)).pow(2).mean() * float(taus[i] - taus[i + 1])
        backward(loss)
        total, x = total + loss.detach(), x_dst
    return total
