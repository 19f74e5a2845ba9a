"""The EMA teacher (SPEC "Teacher": an option, off by default; `resam.teacher_ema`).

The teacher is the student network run without gradient on the weak view. With an EMA teacher,
those passes run with an exponential moving average of the trainable (LoRA) weights instead of
their current values:

    average <- decay * average + (1 - decay) * weight      after every optimizer step

The averages are float32 (bf16 would lose updates of (1 - decay) * weight), start at the weights
the run starts from, and are part of every checkpoint. The frozen SAM weights are the same for
both, so only the LoRA tensors are averaged and swapped. ZeRO stage 0-2 keep every weight whole
and identical on every rank, so every rank holds the same averages without a collective; stage 3
partitions the weights and is refused by the config.

    teacher = EmaTeacher(trainable_parameters, decay)   # after deepspeed.initialize (bf16 cast)
    engine(batch=..., teacher_weights=teacher.weights)  # resam_step enters it around the teacher
    ...; engine.step(); teacher.update()                # when an optimizer step was taken
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


class EmaTeacher:
    """Float32 moving averages of `parameters` (the module's own tensors, in the engine's dtype)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA teacher decay must lie in (0, 1), got {decay}")
        self.parameters = list(parameters)
        if any(hasattr(parameter, "ds_id") for parameter in self.parameters):  # ZeRO-3's mark
            raise ValueError("the EMA teacher needs whole weights (ZeRO stage 0-2); these are ZeRO-3 partitions")
        self.decay = decay
        self.averages = [parameter.detach().float().clone() for parameter in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, from the weights the optimizer step just wrote."""
        for average, parameter in zip(self.averages, self.parameters):
            average.mul_(self.decay).add_(parameter.detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Inside: the parameters hold the averages (cast to their dtype); on exit, their own
        values again, bit for bit (also when the body raises)."""
        with torch.no_grad():
            current = [parameter.detach().clone() for parameter in self.parameters]
        try:
            with torch.no_grad():
                for parameter, average in zip(self.parameters, self.averages):
                    parameter.copy_(average)
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, current):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "averages": [average.cpu().clone() for average in self.averages]}

    def load_state_dict(self, state: dict[str, Any], *, source: str) -> None:
        """Averages saved by `state_dict` (the decay may differ: the configured one is kept, see
        `resume_notice`). ValueError naming `source` when they do not fit these parameters."""
        averages = state.get("averages")
        shapes = [tuple(parameter.shape) for parameter in self.parameters]
        if not isinstance(averages, list) or [tuple(average.shape) for average in averages] != shapes:
            raise ValueError(f"{source}: the EMA teacher's averages do not fit this model's "
                             f"{len(shapes)} LoRA tensors (another lora.rank or lora.start_block?)")
        device = self.averages[0].device if self.averages else torch.device("cpu")
        self.averages = [average.to(device=device, dtype=torch.float32).clone() for average in averages]


def resume_notice(saved: dict[str, Any] | None, decay: float, *, source: str) -> str | None:
    """What a resume from a checkpoint holding EMA state `saved` (None: written without an EMA
    teacher) means under `resam.teacher_ema` = `decay` (0: off). ValueError naming `source` when
    the configured teacher needs averages the checkpoint lacks; a notice when the checkpoint's
    teacher and the configured one differ (the run changes its teacher from here on); else None."""
    if saved is None:
        if decay > 0.0:
            raise ValueError(f"{source} has no EMA teacher (written with resam.teacher_ema 0): resume with "
                             "resam.teacher_ema 0, or start a new train.output_dir")
        return None
    saved_decay = saved.get("decay")
    if decay == 0.0:
        return (f"{source} holds an EMA teacher (decay {saved_decay}) but resam.teacher_ema is 0: its averages "
                "are dropped and the teacher is the live student from here on")
    if saved_decay != decay:
        return (f"{source} holds an EMA teacher with decay {saved_decay}: its averages go on with "
                f"resam.teacher_ema {decay} from here on")
    return None
