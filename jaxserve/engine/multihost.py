"""Multi-host serving: process 0 schedules and serves HTTP; every other process runs the same
compiled steps on its own devices, fed by a broadcast of each step's host inputs.

Protocol per step (a collective every process joins): a header ``[command, shape index]``, then,
for a step, the inputs of that shape. Followers know every compiled shape, so they can build
placeholders of the right structure for the broadcast to fill. A grammar step's inputs come in two
parts: its forward's at dispatch, then its sampling inputs and packed mask once process 0 has
applied the previous step's tokens to the matchers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxserve.engine.compilation import StepShape

logger = logging.getLogger(__name__)

CMD_STEP, CMD_STOP = 0, 1


def initialize(num_processes: int, process_id: int, coordinator_address: str | None) -> None:
    """``jax.distributed.initialize`` (gloo collectives when the devices are CPUs)."""
    if num_processes <= 1:
        return
    if coordinator_address is None:
        raise ValueError("coordinator_address is required when num_processes > 1")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    logger.info("process %d of %d joined %s", process_id, num_processes, coordinator_address)


def shutdown() -> None:
    """Leave the jax.distributed job together (a barrier), so no process sees the others vanish."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


class StepChannel:
    """Broadcasts step inputs from process 0 to the others (a no-op with one process)."""

    def __init__(self, shapes: list[StepShape], zero_inputs: Callable[[StepShape], list[tuple]]) -> None:
        """``zero_inputs(shape)``: placeholders for each part of a step's inputs."""
        self.shapes = list(shapes)
        self.index = {s: i for i, s in enumerate(self.shapes)}
        self.zero_inputs = zero_inputs
        self.active = jax.process_count() > 1

    def _broadcast(self, tree: Any) -> Any:
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree)

    def leader_send(self, shape: StepShape, inputs: tuple) -> None:
        if self.active:
            self._broadcast(np.array([CMD_STEP, self.index[shape]], np.int32))
            self._broadcast(inputs)

    def leader_send_part(self, inputs: tuple) -> None:
        """A later part of the step just sent (a grammar step's sampling inputs)."""
        if self.active:
            self._broadcast(inputs)

    def leader_stop(self) -> None:
        if self.active:
            self._broadcast(np.array([CMD_STOP, 0], np.int32))

    def follower_receive(self) -> tuple[StepShape, tuple] | None:
        """On a follower: the next step the leader sent (its shape and first inputs), or None when it stops."""
        header = np.asarray(self._broadcast(np.zeros(2, np.int32)))
        if int(header[0]) == CMD_STOP:
            return None
        shape = self.shapes[int(header[1])]
        return shape, self._broadcast(self.zero_inputs(shape)[0])

    def follower_receive_part(self, shape: StepShape, part: int) -> tuple:
        return self._broadcast(self.zero_inputs(shape)[part])
