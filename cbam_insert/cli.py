"""The ``cbam-insert`` command: parse arguments, call the API, print the result.

Exit status: 0 done; 1 a user error (one line ``error: ...`` on stderr, nothing written);
2 a usage error found by the argument parser (unknown option, missing value, a non-integer
where an integer is expected); 3 an internal error, i.e. a bug (one line, rerun with
``--debug`` for the traceback); 130 interrupted. ``--debug`` lets every exception through
with its traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import CBAMInsertError, escape
from .options import Option, declared

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

EXIT_USER = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def _json_error(message: str, code: int) -> None:
    """The ``--json`` answer when the command fails: one object on stdout, like a report's."""
    sys.stdout.write(json.dumps({"error": message, "exit_code": code}, indent=2) + "\n")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cbam-insert {__version__}")
        raise typer.Exit()


def _one_line(text: object) -> str:
    """One line, with any control character (a file's names may carry terminal escapes) escaped."""
    return escape(" ".join(str(text).split()), limit=2000)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    try:
        dims = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise CBAMInsertError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if len(dims) < 3 or any(d <= 0 for d in dims):
        raise CBAMInsertError(
            f"--input-shape {text!r}: expected (N, C, *spatial) with positive sizes, like 1,3,224,224"
        )
    return dims


def parse_stages(text: str) -> tuple[int, int]:
    """``"2-4"`` -> ``(2, 4)``; ``"3"`` -> ``(3, 3)``."""
    first, sep, last = text.partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise CBAMInsertError(f"--stages {text!r}: expected a stage or a range like 2-4") from None
    return lo, hi


def _input_shape_problem(model: Any, shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` cannot feed ``model``'s first convolution (rank or channels), or None."""
    from torch import nn

    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        return None
    name, conv = first
    spatial = {1: "L", 2: "H, W", 3: "T, H, W"}.get(len(conv.kernel_size), "...")
    expects = f"the model's first layer {name} ({type(conv).__name__}) expects (N, {conv.in_channels}, {spatial})"
    if len(shape) != len(conv.kernel_size) + 2:
        return f"{expects}; the shape given has rank {len(shape)}"
    if shape[1] != conv.in_channels:
        return f"{expects}; the shape given has {shape[1]} channel(s)"
    return None


def _declared_options() -> dict[str, list[tuple[str, Option]]]:
    """Every module option the registry declares, by name: ``[(module, declaration), ...]``."""
    from .attention import ATTENTION, config_of

    out: dict[str, list[tuple[str, Option]]] = {}
    for name in ATTENTION:
        for opt in declared(config_of(name)):
            out.setdefault(opt.name, []).append((name, opt))
    return out


def _flag_parameter(name: str, decls: list[tuple[str, Option]]) -> inspect.Parameter:
    """The Typer parameter of one module option, from its declarations (one per module)."""
    first = decls[0][1]
    kinds = {o.type for _, o in decls}
    if len(kinds) != 1:  # pragma: no cover - a declaration error, caught by the tests
        raise TypeError(f"module option {name} is declared with different types {kinds}")
    helps = list(dict.fromkeys(o.help for _, o in decls))
    defaults = ", ".join(f"{m} {_show(o.default)}" for m, o in decls if o.default is not None)
    shared = name == "init"
    text = " ".join(h if h.endswith(".") else h + "." for h in helps)
    examples = list(dict.fromkeys(o.example for _, o in decls if o.example))
    if examples:
        text = text[:-1] + ": " + ", ".join(f"{first.flag} {e}" for e in examples) + "."
    text += f" [default: {_show(first.default)}]" if shared else (f" [default: {defaults}]" if defaults else "")
    if first.type is bool:
        flag = f"{first.flag}/--no-{first.flag[2:]}"
        annotation: Any = Annotated[bool | None, typer.Option(flag, show_default=False, help=text)]
    else:
        typ = {int: int, float: float}.get(first.type, str)
        annotation = Annotated[typ | None, typer.Option(first.flag, metavar=first.metavar or "VALUE", show_default=False, help=text)]
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation)


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _with_module_options(func: Callable[..., None]) -> Callable[..., None]:
    """``func`` with one CLI flag per declared module option (inserted after ``--module``); the
    flags given arrive as ``module_options`` (a dict of what the command line said)."""
    declared_options = _declared_options()
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "module_options"]
    at = [p.name for p in params].index("module") + 1
    extra = [_flag_parameter(name, decls) for name, decls in declared_options.items()]
    clash = {p.name for p in params} & {p.name for p in extra}
    if clash:  # pragma: no cover - a declaration error, caught by the tests
        raise TypeError(f"module options {clash} collide with the command's own parameters")
    params = params[:at] + extra + params[at:]

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        values = {name: kwargs.pop(name, None) for name in declared_options}
        given = {name: value for name, value in values.items() if value is not None}
        func(**kwargs, module_options=given)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _module_options(module: str, given: dict[str, Any]) -> dict[str, Any]:
    """The command line's module options as ``module`` takes them, or a one-line error naming
    the flag that ``module`` does not declare."""
    from .attention import ATTENTION, config_of

    if module not in ATTENTION:
        extra = sorted(k for k in given if k != "init")
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise CBAMInsertError(f"{flag}: a user class (--module {module}) takes no options from the command line but --init")
        return dict(given)
    opts = {o.name: o for o in declared(config_of(module))}
    out = {}
    for name, value in given.items():
        if name not in opts:
            valid = ", ".join(o.flag for o in opts.values())
            raise CBAMInsertError(f"--{name.replace('_', '-')} is not an option of --module {module} (its options: {valid})")
        out[name] = opts[name].from_text(value) if isinstance(value, str) else value
    return out


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], AbstractContextManager[None]]]:
    """Yield ``step(what)``: a transient spinner with elapsed time on stderr while a step runs.

    Silent (no colour, no animation) when ``enabled`` is false.
    """
    if not enabled:
        yield lambda what: nullcontext()
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True),
        transient=True,
    )  # fmt: skip

    @contextmanager
    def step(what: str) -> Iterator[None]:
        task = progress.add_task(what, total=None)
        try:
            yield
        finally:
            progress.remove_task(task)

    with progress:
        yield step


def _device(text: str) -> Any:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CBAMInsertError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CBAMInsertError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    return device


@app.command(
    name="cbam-insert",
    epilog="Exit status: 0 done, 1 user error (one line on stderr, nothing written), "
    "2 usage error, 3 internal error (rerun with --debug), 130 interrupted. Full reference: docs/cli.md."
)
@_with_module_options
def main_command(
    source: Annotated[str | None, typer.Argument(
        metavar="SOURCE", show_default=False,
        help="A model file (torch.save(model); a state dict or .safetensors with --arch; a file this tool saved) "
        "or a built-in architecture with random weights: torchvision:resnet50, timm:resnet50.",
    )] = None,
    after: Annotated[str, typer.Option(
        "--after", metavar="PLACEMENT",
        help="Where CBAM goes. conv: after each conv unit, i.e. after the conv together with the norm and "
        "activation that directly follow it (conv-bn-relu: after the relu); block: on the residual branch of "
        "each residual merge, before the add (the paper's placement); stage: after each backbone stage; or a "
        "module name, glob, regex or class name: --after 'layer4.*.bn3', --after 're:layer[34]\\.\\d+\\.bn3', "
        "--after Bottleneck.",
    )] = "block",
    include: Annotated[list[str] | None, typer.Option(
        "--include", metavar="PATTERN", show_default=False,
        help="Keep only sites whose name matches (glob, or regex with re:); repeatable: "
        "--include 'layer3.*' --include 'layer4.*'.",
    )] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", metavar="PATTERN", show_default=False,
        help="Drop sites whose name matches; repeatable: --exclude 'layer1.*'.",
    )] = None,
    stages: Annotated[str | None, typer.Option(
        "--stages", metavar="FIRST-LAST", show_default=False,
        help="Only sites in these backbone stages (1-based, inclusive): --stages 2-4, --stages 3.",
    )] = None,
    every: Annotated[int, typer.Option("--every", metavar="N", help="Keep every N-th site: --every 2.")] = 1,
    max_sites: Annotated[int | None, typer.Option(
        "--max-sites", metavar="K", show_default=False, help="Keep at most K sites: --max-sites 4.",
    )] = None,
    min_channels: Annotated[int, typer.Option(
        "--min-channels", metavar="C", help="Skip sites with fewer channels: --min-channels 64.",
    )] = 1,
    repatch: Annotated[bool, typer.Option(
        "--repatch", help="Add another CBAM where the model already has one (otherwise those sites are skipped).",
    )] = False,
    reuse_input: Annotated[bool, typer.Option(
        "--reuse-input/--no-reuse-input",
        help="In inference, CBAM writes into its input where nothing else reads that tensor (one allocation "
        "less per site, like ReLU(inplace=True)).",
    )] = True,
    module: Annotated[str, typer.Option(
        "--module", metavar="NAME",
        help="The attention module: cbam (default), se, eca, coord, simam, bam, gam, triplet, or your own "
        "class as pkg.mod:Class (built as Class(channels), with dims= when it takes it; it must keep the "
        "feature map's shape): --module eca, --module mypkg.attn:MyAttention. Each module's options follow; "
        "an option another module declares is refused. See docs/attention.md.",
    )] = "cbam",
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="N", show_default=False,
        help="Seed for the new CBAM weights and for the random weights of a built-in torchvision:/timm: "
        "model (reproducible files): --seed 0.",
    )] = None,
    arch: Annotated[str | None, typer.Option(
        "--arch", metavar="SPEC", show_default=False,
        help="Architecture for a weights-only file: cbam-insert w.safetensors --arch torchvision:resnet50.",
    )] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", metavar="FILE", show_default=False,
        help="A state dict (.pth) or .safetensors file for --arch: --arch torchvision:resnet50 --weights w.pth.",
    )] = None,
    trust: Annotated[bool, typer.Option(
        "--trust",
        help="Unpickle a torch.save file with the full unpickler, which can run code from it: only for files "
        "you trust.",
    )] = False,
    fmt: Annotated[str | None, typer.Option(
        "--format", metavar="FORMAT", show_default=False,
        help="Output format: pt, state-dict, safetensors, adapter (only the CBAM weights and the recipe, as "
        ".safetensors), torchscript, onnx, pt2 [default: from the -o extension, else pt]: --format safetensors. "
        "A file this tool patched converts to another format without being patched again.",
    )] = None,
    static_shapes: Annotated[bool, typer.Option(
        "--static-shapes",
        help="onnx/pt2: fix every input shape to the example's (default: dynamic batch, and dynamic height and "
        "width where the model allows).",
    )] = False,
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", metavar="SHAPE", show_default=False,
        help="Example input for single-tensor models [default: from the first conv, 1,3,224,224 for RGB image "
        "models]: --input-shape 1,3,64,64.",
    )] = None,
    device: Annotated[str, typer.Option(
        "--device", metavar="DEVICE",
        help="Where shapes are propagated, FLOPs counted and --bench runs: --device cuda.",
    )] = "cpu",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", metavar="FILE", show_default=False,
        help="Where to save [default: beside the input as NAME_cbam.EXT, EXT from --format (.pt, .pth, "
        ".safetensors, .ts, .onnx, .pt2); ./NAME_cbam.EXT for torchvision:NAME, e.g. resnet18_cbam.onnx].",
    )] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run",
        help="List every site, used or skipped with the reason, and the cost the patch would add; write nothing.",
    )] = False,
    as_json: Annotated[bool, typer.Option(
        "--json",
        help="Print the report as JSON on stdout and nothing else there; on failure one object with error and "
        "exit_code: cbam-insert m.pt --json | jq .params.",
    )] = False,
    bench: Annotated[bool, typer.Option(
        "--bench", help="Also time the original and the patched model on the example input: min, median and max "
        "over the rounds and the ratio; warns when the rounds disagree by more than 1.2x.",
    )] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the output path.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.",
    )] = False,
    module_options: dict[str, Any] | None = None,
) -> None:
    """Put CBAM attention into a PyTorch model, report what it adds, and save the result.

    \b
    Examples:
      cbam-insert model.pt --after conv                # every conv unit; saves model_cbam.pt beside model.pt
      cbam-insert torchvision:resnet18 --after block -o out.pt
      cbam-insert torchvision:resnet50 --dry-run       # list sites (used/skipped, why) and the cost; write nothing
      cbam-insert torchvision:resnet50 --stages 3-4 --reduction 8 --kernel-size 3 --init identity --seed 0
      cbam-insert w.pth --arch torchvision:resnet50 --format safetensors -o r50_cbam.safetensors
      cbam-insert torchvision:resnet18 --input-shape 1,3,64,64 --json --dry-run | jq .params

    FLOPs are multiply-accumulates of convolutions and matrix products (torchvision's convention).
    """
    if source is None and weights is None:
        raise typer.BadParameter(
            "none given; pass a model file or torchvision:NAME (or --weights FILE --arch SPEC)", param_hint="SOURCE"
        )
    if source is not None and weights is not None:
        raise typer.BadParameter("give the weights file either as SOURCE or as --weights, not both", param_hint="--weights")
    def fail(code: int, message: str) -> typer.Exit:
        sys.stderr.write(f"error: {message}\n")
        if as_json:
            _json_error(message, code)
        return typer.Exit(code)

    try:
        _run(
            source=source, after=after, include=include, exclude=exclude, stages=stages, every=every,
            max_sites=max_sites, min_channels=min_channels, repatch=repatch, reuse_input=reuse_input,
            module=module, module_options=module_options or {},
            seed=seed, arch=arch, weights=weights, trust=trust, fmt=fmt, static_shapes=static_shapes,
            input_shape=input_shape, device=device,
            output=output, force=force, dry_run=dry_run, as_json=as_json, bench=bench, quiet=quiet,
        )  # fmt: skip
    except typer.Exit:
        raise
    except CBAMInsertError as exc:
        if debug:
            raise
        raise fail(EXIT_USER, _one_line(exc)) from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise fail(EXIT_INTERRUPTED, "interrupted; nothing was written") from None
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        raise fail(
            EXIT_INTERNAL,
            f"internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
            "(a bug in cbam-insert; rerun with --debug for the traceback and report it)",
        ) from None


def _run(
    *,
    source: str | None,
    after: str,
    include: list[str] | None,
    exclude: list[str] | None,
    stages: str | None,
    every: int,
    max_sites: int | None,
    min_channels: int,
    repatch: bool,
    reuse_input: bool,
    module: str,
    module_options: dict[str, Any],
    seed: int | None,
    arch: str | None,
    weights: Path | None,
    trust: bool,
    fmt: str | None,
    static_shapes: bool,
    input_shape: str | None,
    device: str,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
    bench: bool,
    quiet: bool,
) -> None:
    from rich.console import Console

    if weights is not None and arch is None:
        raise CBAMInsertError("--weights needs --arch, e.g. --arch torchvision:resnet50 --weights w.pth")
    src = str(weights) if weights is not None else str(source)
    shape = parse_shape(input_shape) if input_shape is not None else None
    stage_range = parse_stages(stages) if stages is not None else None
    options = _module_options(module, module_options)
    dev = _device(device)

    from .formats import default_output
    from .load import load_model
    from .save import check_output, save_model

    out: Path | None = None
    if not dry_run:  # checked before any work, and once more by save_model
        out, fmt = check_output(output if output is not None else default_output(src, fmt or "pt"), fmt,
                                force=force, source=src)  # fmt: skip

    selection: dict[str, Any] = {
        "include": include or None, "exclude": exclude or None, "stages": stage_range, "every": every,
        "max_sites": max_sites, "min_channels": min_channels,
    }  # fmt: skip
    stdout_tty = sys.stdout.isatty()
    console = Console(highlight=False, width=None if stdout_tty else 1000)  # piped: no wrapping
    with _progress(not quiet and stdout_tty and sys.stderr.isatty()) as step:
        import torch

        from .api import NoSiteError, PatchReport, insert_attention
        from .recipe import Recipe, describe_inputs, make_inputs
        from .report import benchmark, cost_report, render_bench, render_report, report_dict, site_latency

        with step(f"loading {src}"), torch.random.fork_rng(devices=[]):
            if seed is not None:  # a built-in spec's random weights are part of a reproducible file too
                torch.manual_seed(seed)
            model = load_model(src, arch=arch, trust=trust).to(dev)
        from .integrations.ultralytics import is_yolo_model

        if is_yolo_model(model):  # hooked CBAM children, written back as an Ultralytics checkpoint
            if module != "cbam":
                raise CBAMInsertError(f"--module {module}: Ultralytics models take CBAM only (their integration hooks "
                                      "CBAM children); use the default --module cbam")  # fmt: skip
            _run_yolo(model, after=after, cbam=options, seed=seed, shape=shape, out=out, fmt=fmt, force=force,
                      static_shapes=static_shapes, src=src, as_json=as_json, quiet=quiet, console=console)  # fmt: skip
            return
        inputs = None
        if shape is not None:
            inputs = (torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dev),)
        patched = cost = timing = example = None
        why_none = ""
        converted = False
        with step("tracing and inserting CBAM"):
            try:
                patched = insert_attention(
                    model, after=after, example_inputs=inputs, module=module, allow_repatch=repatch, seed=seed,
                    reuse_input=reuse_input, **selection, **options
                )
                report = patched.cbam_report
            except NoSiteError as exc:
                if _already_patched(model, exc.sites) and not dry_run:  # this tool's file: convert, not patch again
                    from .adapter import remove_cbam

                    patched, model, converted = model, remove_cbam(model), True
                    report = _whole_report(patched)
                elif not dry_run:
                    raise
                else:
                    report, why_none = PatchReport(after, exc.sites, [], [], exc.untraced, module), _one_line(exc)
                    if _already_patched(model, exc.sites):
                        why_none += "; already patched: -o FILE converts it to another format without patching again"
            except CBAMInsertError as exc:
                hint = _input_shape_problem(model, shape) if shape is not None else None
                if hint is not None:
                    raise CBAMInsertError(f"--input-shape {input_shape}: {hint}") from exc
                raise
        if patched is not None:
            spec = Recipe.from_json(patched.cbam_recipe).example_inputs
            example = make_inputs(spec, device=dev)
            with step("counting parameters and FLOPs"):
                cost = cost_report(model, patched, example, modules=report.modules)
            if bench:
                with step("timing the original and the patched model"):
                    timing = benchmark(model, patched, example)
                    timing.per_site = site_latency(patched, example, report.modules)
        if not (quiet or as_json):
            shape_text = _describe_shape(describe_inputs(example)) if example is not None else None
            for renderable in render_report(report, cost, model=patched, show_skipped=dry_run, inputs=shape_text):
                _print(console, renderable)
            if timing is not None:
                _print(console, render_bench(timing))
        if out is not None and patched is not None:
            with step(f"saving {out}"):
                if dev.type != "cpu":
                    patched, example = patched.to("cpu"), make_inputs(spec)
                save_model(patched, out, fmt, example_inputs=example, force=force, dynamic=not static_shapes)
    if as_json:
        data = report_dict(report, cost, output=str(out) if out else None, bench=timing, dry_run=dry_run,
                           inputs=describe_inputs(example) if example is not None else None)  # fmt: skip
        data["source"] = src
        if converted:
            data["converted"] = True  # already patched: written as it was, not patched again
        if why_none:
            data["error"] = why_none
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif quiet:
        if out is not None:
            sys.stdout.write(f"{out}\n")
    elif why_none:
        _print(console, f"dry run, nothing written: {why_none}", soft_wrap=True)
    elif out is not None and converted:
        _print(
            console,
            f"already patched ({len(report.modules)} CBAM module(s)): converted to {out} without patching again",
            soft_wrap=True,
        )
    elif out is not None:
        kind = "CBAM" if module == "cbam" else module
        _print(console, f"saved {len(report.modules)} {kind} module(s) to {out}", soft_wrap=True)
    else:
        _print(console, "dry run: nothing written", soft_wrap=True)


def _print(console: Any, renderable: Any, **kwargs: Any) -> None:
    """``console.print``; when stdout is not a terminal, without the spaces Rich pads each line
    with to the console's width."""
    if console.is_terminal:
        console.print(renderable, **kwargs)
        return
    with console.capture() as captured:
        console.print(renderable, **kwargs)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _run_yolo(
    model: Any, *, after: str, cbam: dict[str, Any], seed: int | None, shape: tuple[int, ...] | None, out: Path | None,
    fmt: str | None, force: bool, static_shapes: bool, src: str, as_json: bool, quiet: bool, console: Any,
) -> None:
    """Patch an Ultralytics model (``cbam_insert.integrations.ultralytics``) and save it; ``pt``
    is an Ultralytics checkpoint that ``YOLO(path)`` loads."""
    import copy

    import torch

    from .integrations.ultralytics import cbam_modules, patch_model
    from .save import save_model

    imgsz = shape[-1] if shape is not None else 64
    patched = copy.deepcopy(model)
    added = patch_model(patched, after, imgsz=imgsz, seed=seed, **cbam)
    if not added and not cbam_modules(patched):
        raise CBAMInsertError(f"no site for after={after!r} in {type(model).__name__}")
    params = sum(p.numel() for name in added for p in patched.get_submodule(name).parameters())
    if out is not None:
        example = (torch.rand(1, 3, imgsz, imgsz),)
        save_model(patched.cpu(), out, fmt, example_inputs=example, force=force, dynamic=not static_shapes)
    if as_json:
        data = {"source": src, "ultralytics": True, "modules": added, "params_added": params,
                "output": str(out) if out else None, "dry_run": out is None}  # fmt: skip
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif quiet:
        if out is not None:
            sys.stdout.write(f"{out}\n")
    else:
        what = f"saved {len(added)} CBAM module(s) (+{params:,} params) to {out}" if out else (
            f"dry run: would add {len(added)} CBAM module(s) (+{params:,} params); nothing written")
        if out is not None and (fmt or "pt") == "pt":
            what += " (an Ultralytics checkpoint: YOLO(path) loads it with cbam-insert installed)"
        _print(console, what, soft_wrap=True)


def _already_patched(model: Any, sites: Any) -> bool:
    """Whether patching found no new site because ``model`` is one this tool patched (a file it
    wrote) and its sites already have CBAM: then it is converted instead."""
    recipe = getattr(model, "cbam_recipe", None)
    return (
        isinstance(recipe, dict)
        and bool(recipe.get("steps"))
        and any(s.reason.startswith("already has ") for s in sites)
    )


def _whole_report(model: Any) -> Any:
    """The report of an already-patched model, naming every CBAM module its recipe added."""
    from dataclasses import replace

    modules = [name for step in model.cbam_recipe["steps"] for name in step["modules"]]
    return replace(model.cbam_report, modules=modules)


def _describe_shape(spec: Any) -> str:
    if "tuple" in spec and len(spec["tuple"]) == 1:
        return _describe_shape(spec["tuple"][0])
    if "shape" in spec:
        return "x".join(map(str, spec["shape"]))
    items = spec.get("list", spec.get("tuple", []))
    inner = ", ".join(_describe_shape(s) for s in items)
    return f"[{inner}]" if "list" in spec else f"({inner})"


def main() -> None:
    """Console-script entry point."""
    if "--json" not in sys.argv[1:]:
        app(prog_name="cbam-insert")
        return
    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, vendored by newer typer releases
    try:  # usage errors too answer with one JSON object on stdout
        code = app(prog_name="cbam-insert", standalone_mode=False)
    except usage_error as exc:
        exc.show()
        _json_error(_one_line(exc.format_message()), EXIT_USAGE)
        sys.exit(EXIT_USAGE)
    except typer.Abort:
        sys.stderr.write("error: interrupted; nothing was written\n")
        _json_error("interrupted; nothing was written", EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
