"""The one place that lowers for a device this machine does not have (CUDA GPUs, TPUs).

The recipe touches APIs that move between jax versions (``AbstractDevice``'s home, the
``AbstractMesh`` signature, ``jax.export``'s custom-call safety checks): an upgrade that breaks it
fails here, with a message that says so. Lowering goes as far as a platform's compiler input
(StableHLO with a Triton or Mosaic custom call); nothing is compiled or run.
"""

from __future__ import annotations

import jax

# device kind -> (platform of AbstractDevice, jax.export platform, device_kind string, cores)
DEVICES = {
    "h100": ("gpu", "cuda", "NVIDIA H100 80GB HBM3", 132),
    "v5e": ("tpu", "tpu", "TPU v5 lite", 1),
    "v6e": ("tpu", "tpu", "TPU v6 lite", 1),
}
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}  # what a Pallas kernel lowers to
AXES = ("data", "model")  # jaxserve.sharding's mesh axes


class LoweringRecipeBroken(RuntimeError):
    """This jax moved an API the lowering recipe uses: update tests/lowering/helpers.py."""


def _abstract_device_cls():
    try:
        from jax.sharding import AbstractDevice  # jax >= 0.11

        return AbstractDevice
    except ImportError:
        pass
    try:
        from jax._src.mesh import AbstractDevice  # jax 0.10

        return AbstractDevice
    except ImportError as e:
        raise LoweringRecipeBroken(f"jax {jax.__version__}: no AbstractDevice ({e}); update tests/lowering/helpers.py") from e


def abstract_mesh(device: str, tp: int = 1) -> jax.sharding.AbstractMesh:
    """A ``(data=1, model=tp)`` mesh of abstract ``device``s (a key of ``DEVICES``)."""
    platform, _, kind, cores = DEVICES[device]
    try:
        dev = _abstract_device_cls()(device_kind=kind, num_cores=cores, platform=platform)
        auto = (jax.sharding.AxisType.Auto,) * 2
        return jax.sharding.AbstractMesh((1, tp), AXES, axis_types=auto, abstract_device=dev)
    except TypeError as e:
        raise LoweringRecipeBroken(f"jax {jax.__version__}: AbstractDevice/AbstractMesh signature changed ({e}); "
                                   "update tests/lowering/helpers.py") from e


def lower_text(fn, args: tuple, device: str, mesh: jax.sharding.AbstractMesh | None = None) -> str:
    """StableHLO text of ``fn(*args)`` exported for ``device``'s platform (``fn`` jitted or not)."""
    return export(fn, args, device, mesh).mlir_module()


def export(fn, args: tuple, device: str, mesh: jax.sharding.AbstractMesh | None = None) -> jax.export.Exported:
    """``fn(*args)`` exported for ``device``'s platform (``fn`` jitted or not), before partitioning.

    ``args`` are arrays or ``ShapeDtypeStruct``s (with shardings on ``mesh`` for several devices).
    """
    mesh = mesh or abstract_mesh(device)
    export_platform = DEVICES[device][1]
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALL.values()]
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(jitted, platforms=[export_platform], disabled_checks=checks)(*args)
