"""The ``lightning`` command: ``lightning fit|validate|test|predict --config configs/<file>.yaml``.

Any ``LightningModule`` / ``LightningDataModule`` subclass can be named in the config by its import path
(``model.class_path`` / ``data.class_path``), so new phases need no changes here.
"""

from __future__ import annotations

from envs.gl import select_headless_gl

select_headless_gl()  # before anything (a datamodule, an env) imports mujoco

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402


def main(args: ArgsType = None) -> LightningCLI:
    """Run the Lightning CLI; ``args`` overrides ``sys.argv[1:]`` (a list of strings or a dict)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
