"""The quickstart's fine-tuning phase at three learning rates, with and without its cosine decay: six variants.

    python -m tljax.sweep --config=configs/quickstart.py --workdir=runs/sweep --sweep=configs/sweeps/quickstart.py

Every variant shares phase 1 (the head on cached features), which trains once in runs/sweep/_shared/.
"""

from tljax.research import sweeps


def get_sweep():
    return sweeps.product({"phases[1].optimizer.learning_rate": (1e-4, 3e-4, 1e-3),
                           "phases[1].schedule.name": ("cosine_decay_schedule", "constant")})
