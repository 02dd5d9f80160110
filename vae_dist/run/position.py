"""Where a run is: the record the Learner keeps and every checkpoint saves, in one strict schema:
a key missing, unknown or of the wrong type, or a position the trainer cannot have written, fails."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, model_validator, with_config
from typing_extensions import TypedDict

from vae_dist.config import TrainingConfig, resume_mismatch
from vae_dist.errors import CheckpointError, ConfigError, TrainingError

Count = Annotated[int, Field(ge=0)]
# A diverged metric: NaN in memory, null in JSON (as every file vae_dist writes has it: fileio.dumps).
NonFinite = Annotated[None, AfterValidator(lambda _: math.nan)]
# One epoch's metrics (metrics.jsonl's rows): these keys and split/name numbers.
Row = with_config(ConfigDict(strict=True))(TypedDict("Row", {  # type: ignore[call-overload]
    "epoch": Annotated[int, Field(ge=1)], "step": Count, "complete_epoch": bool,
    "protocol": dict[str, Union[str, int, float]],
}, extra_items=Union[int, float, NonFinite]))
# Saved as config.json's object; one the schema refuses is a ConfigError: read_manifest's unusable checkpoint.
SavedConfig = Annotated[TrainingConfig, PlainSerializer(TrainingConfig.to_dict)]


class Position(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # a row's inf or NaN: written null
    epoch: Count  # epochs finished; the one in progress is epoch + 1
    batches_done: Count  # optimizer steps already taken in the epoch in progress
    global_step: Count
    train_sums: Annotated[list[float], Field(min_length=2)]  # the partial epoch's [*terms, images], over all ranks
    history: list[Row]
    wandb_run_id: Optional[str]
    num_processes: Annotated[int, Field(ge=1)]  # batches_done counts global batches of this many ranks
    config: SavedConfig  # the config trained under up to here: config.json can be edited, this cannot

    @classmethod
    def start(cls, wandb_run_id: str, num_processes: int, config: TrainingConfig, terms: int) -> Position:
        return cls(epoch=0, batches_done=0, global_step=0, train_sums=[0.0] * (terms + 1), history=[],
                   wandb_run_id=wandb_run_id, num_processes=num_processes, config=config)

    @model_validator(mode="after")
    def _as_the_trainer_writes_it(self) -> Position:
        # One row per finished epoch, then perhaps the epoch in progress's (a stop at max_steps).
        rows = self.history
        if [r["epoch"] for r in rows] != list(range(1, len(rows) + 1)) or len(rows) - self.epoch not in (0, 1):
            raise ValueError(f"history must have one row per finished epoch ({self.epoch}), then at most one more")
        if [r["complete_epoch"] for r in rows] != [True] * self.epoch + [False] * (len(rows) - self.epoch):
            raise ValueError("only the rows of finished epochs may be complete")
        epoch_start = rows[self.epoch - 1]["step"] if self.epoch else 0
        if self.global_step != epoch_start + self.batches_done:
            raise ValueError("global_step must be the last finished epoch's step plus batches_done")
        if len(rows) > self.epoch and not epoch_start < rows[-1]["step"] <= self.global_step:
            raise ValueError("the epoch in progress's row must lie inside it")
        return self

    def results(self) -> dict[str, Any]:
        """What the weights here scored (validation, protocol), from the row of this step; {} between validations."""
        row = next((r for r in self.history if r["step"] == self.global_step), {})
        return {k: v for k, v in row.items() if k.startswith("valid/") or k in ("epoch", "step", "protocol")}

    def check_resumable(self, name: str, config: TrainingConfig, num_processes: int, steps_per_epoch: int) -> None:
        """Whether a run of ``config``, ``num_processes`` ranks and ``steps_per_epoch`` can continue from here."""
        if mismatch := resume_mismatch(self.config, config, saved_as=f"{name} was trained with"):
            raise ConfigError(f"cannot resume: {mismatch}")
        reached = self.epoch + (self.batches_done > 0)  # counting the epoch in progress
        if config.epochs < reached:  # the run would end at once, its weights passing for an earlier epoch's
            into = f", {self.batches_done} batches into it" if self.batches_done else ""
            raise ConfigError(f"--epochs {config.epochs} is below epoch {reached}, which {name} has reached{into}; "
                              f"give at least {reached}")
        if config.max_steps is not None and self.global_step > config.max_steps:
            raise ConfigError(f"--max-steps {config.max_steps} is below step {self.global_step}, where {name} "
                              f"stopped; give at least {self.global_step}")
        if self.batches_done and self.num_processes != num_processes:
            raise TrainingError(f"cannot resume mid-epoch from {name} with {num_processes} process(es): it was written "
                                f"by {self.num_processes}; resume with {self.num_processes} (a different count can "
                                "resume at an epoch end)")
        # Equal: a stop on an epoch's last batch, saved before its end. More: already loaded, so no older one is tried.
        if self.batches_done > steps_per_epoch:
            raise CheckpointError(
                f"cannot resume from {name}: it is {self.batches_done} batches into an epoch of {steps_per_epoch}")
