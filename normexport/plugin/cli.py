"""The `normexport plugin` click group: build the libraries, print their paths."""

from __future__ import annotations

from pathlib import Path

import click

from normexport.plugin.building import DEFAULT_BUILD_DIR, DEFAULT_CUDA_ARCHS, build, find_kernel_library, find_plugin_library


@click.group(name="plugin")
def plugin_cli() -> None:
    """Build and locate the RMSNorm CUDA kernel and TensorRT plugin (plugins/rmsnorm)."""


@plugin_cli.command("build")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"CMake build folder [default: {DEFAULT_BUILD_DIR}]")
@click.option("--tensorrt-root", default=None, metavar="DIR",
              help="TensorRT SDK root with include/ and lib/ [default: $TENSORRT_ROOT]; without TensorRT only the "
                   "kernel library is built")
@click.option("--cuda-archs", default=None, metavar="LIST",
              help=f"CMAKE_CUDA_ARCHITECTURES, e.g. '90' or '80-real;90' [default: {DEFAULT_CUDA_ARCHS}]")
def build_command(build_dir: Path | None, tensorrt_root: str | None, cuda_archs: str | None) -> None:
    """Compile the kernel library (always) and the TensorRT plugin (when TensorRT is found)."""
    result = build(build_dir=build_dir, tensorrt_root=tensorrt_root, cuda_archs=cuda_archs)
    click.echo(f"built   {result.kernel_lib}  (CUDA architectures {result.cuda_architectures})")
    if result.plugin_lib is not None:
        click.echo(f"built   {result.plugin_lib}")
    for line in result.skipped:
        click.echo(f"skipped {line}")
    click.echo(f"log     {result.log}  ({result.seconds:.1f} s)")


@plugin_cli.command("path")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"CMake build folder [default: {DEFAULT_BUILD_DIR}]")
@click.option("--kernel", "which", flag_value="kernel", help="Print the kernel library instead of the plugin.")
@click.option("--plugin", "which", flag_value="plugin", default=True, help="Print the TensorRT plugin (default).")
def path_command(build_dir: Path | None, which: str) -> None:
    """Print the path of a built library, e.g. for trtexec --dynamicPlugins=$(normexport plugin path)."""
    found = find_kernel_library(build_dir) if which == "kernel" else find_plugin_library(build_dir)
    click.echo(str(found))
