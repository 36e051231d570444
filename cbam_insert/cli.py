"""The ``cbam-insert`` command: parse arguments, call the API, print the result."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import CBAMInsertError

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cbam-insert {__version__}")
        raise typer.Exit()


def _parse_shape(text: str | None) -> tuple | None:
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise CBAMInsertError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if len(dims) < 3 or any(d <= 0 for d in dims):
        raise CBAMInsertError(f"--input-shape {text!r}: expected (N, C, *spatial) with positive sizes, like 1,3,224,224")
    return dims


@app.command()
def main_command(
    source: str = typer.Argument(..., help="Model file (torch.save(model)) or a built-in spec: torchvision:resnet50"),
    after: str = typer.Option("block", "--after", help="Placement: conv (after conv+norm+act), block (residual branch, before the merge), stage, or a module name/glob/regex/class, e.g. 'layer4.*.bn3'"),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to save; default: beside the input as NAME_cbam.pt"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file"),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Example input for single-tensor models, e.g. 1,3,224,224"),
    include: list[str] | None = typer.Option(None, "--include", help="Keep only sites whose name matches (glob/regex), e.g. 'layer[34].*'"),
    exclude: list[str] | None = typer.Option(None, "--exclude", help="Drop sites whose name matches, e.g. 'layer1.*'"),
    reduction: int = typer.Option(16, "--reduction", help="Channel MLP reduction ratio r (hidden = max(1, C // r))"),
    kernel_size: int = typer.Option(7, "--kernel-size", help="Spatial attention kernel size (odd), e.g. 3"),
    variant: str = typer.Option("seed", "--variant", help="seed (bias-free) or official (authors' code: MLP biases, BN after spatial conv)"),
    init: str = typer.Option("default", "--init", help="default, or identity: the patched model computes exactly what the original did"),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible CBAM weights"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the sites and the cost; write nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the output path"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit"),
) -> None:
    """Put CBAM into a PyTorch model and save the result.

    Example: cbam-insert torchvision:resnet50 --after block -o resnet50_cbam.pt
    """
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        from .api import insert_cbam
        from .io import default_output, load_model, save_model
        from .report import FLOP_NOTE, cost_report

        out = output or default_output(source)
        if not dry_run:
            if Path(str(source)).exists() and Path(out).resolve() == Path(str(source)).resolve():
                raise CBAMInsertError(f"output {out} is the input file; choose another -o")
            if Path(out).exists() and not force:
                raise CBAMInsertError(f"output {out} exists; pass --force to overwrite")
        model = load_model(source)
        shape = _parse_shape(input_shape)
        import torch

        inputs = (torch.rand(*shape),) if shape else None
        patched = insert_cbam(model, after=after, example_inputs=inputs, include=include or None, exclude=exclude or None,
                              reduction=reduction, kernel_size=kernel_size, variant=variant, init=init, seed=seed)  # fmt: skip
        report = patched.cbam_report
        from .api import make_inputs

        example = make_inputs(patched.cbam_recipe["steps"][-1]["example_inputs"])
        cost = cost_report(model, patched, example)
        if not quiet:
            table = Table(title=f"CBAM sites (after={after})")
            for col in ("site", "kind", "channels", "spatial", "used", "note"):
                table.add_column(col)
            for s in report.sites:
                table.add_row(s.name, s.kind, str(s.channels), "x".join(map(str, s.spatial)), "yes" if s.used else "no", s.reason)
            console.print(table)
            d = cost.to_dict()
            console.print(f"params: {d['params']['before']:,} -> {d['params']['after']:,} (+{d['params']['delta']:,}, {d['params']['percent']:+.2f}%)")
            console.print(f"MACs:   {d['flops']['before']:,} -> {d['flops']['after']:,} (+{d['flops']['delta']:,}, {d['flops']['percent']:+.3f}%)")
            console.print(FLOP_NOTE)
        if dry_run:
            return
        save_model(patched, out)
        console.print(f"saved {len(report.modules)} CBAM modules: {out}" if not quiet else str(out))
    except CBAMInsertError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None


def main() -> None:
    app(prog_name="cbam-insert")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
