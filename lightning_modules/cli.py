"""The ``lightning`` command: ``lightning fit|validate|test|predict --config configs/<file>.yaml``.

Any ``LightningModule`` / ``LightningDataModule`` subclass can be named in the config by its import path
(``model.class_path`` / ``data.class_path``), so new phases need no changes here.
"""

from __future__ import annotations

from envs.gl import select_headless_gl

select_headless_gl()  # before anything (a datamodule, an env) imports mujoco

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402


def build_cli(args: ArgsType = None) -> LightningCLI:
    """Run the Lightning CLI and return it (for tests); ``args`` overrides ``sys.argv[1:]``."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """The ``lightning`` console script. Returns None: it is called as ``sys.exit(main())``, where a returned
    object would become exit status 1."""
    build_cli(args)


if __name__ == "__main__":
    main()
