"""``cxr-screen synthesize``: options from SynthesizeParameters."""

from __future__ import annotations

from rich.markup import escape

from cli import lifeline
from cli.exits import clean_errors
from cli.options import OptionSpec, parameters_command
from cli.output import JSON_OPTION, console, json_mode, print_json
from flows.parameters import SynthesizeParameters

__all__ = ["synthesize"]

SYNTHESIZE_OPTIONS = {
    "synthetic_class": OptionSpec(name="--class"),
    "generator_store_uri": OptionSpec(envvar="CXR_GENERATOR_STORE"),
    "weights": OptionSpec(envvar="CXR_WEIGHTS"),
    "input_size": OptionSpec(envvar="CXR_TRAIN_INPUT_SIZE"),
}


@parameters_command(SynthesizeParameters, arguments=["dataset_uri"], specs=SYNTHESIZE_OPTIONS)
def synthesize(params: SynthesizeParameters, as_json: bool = JSON_OPTION) -> None:
    """Train a GAN on a dataset's training split; publish synthetic images of one class, unless they copy patients."""
    json_mode(as_json)
    lifeline.arm()
    from flows.synthesize import synthesize as synthesize_flow

    with clean_errors(), console.status(f"Synthesising {params.count} {escape(params.synthetic_class)} image(s) "
                                        f"(GAN: {params.epochs} epochs at {params.image_size} px)"):
        result = synthesize_flow(params)
    for name, found in result.quality.classes.items():
        ratio = "n/a" if found["ratio"] is None else f"{found['ratio']:.2f}"
        memorisation = found["memorisation"]["spaces"]
        console.print(f"  {escape(name)}: Fréchet distance {found['fd']:.4g} vs floor {found['floor']:.4g} "
                      f"(x{ratio}); nearest real image, 5% quantile: " + ", ".join(
                          f"{space} {values['synthetic_to_real']['q05']:.3g} (real-to-real "
                          f"{values['real_to_real']['q05']:.3g})" for space, values in memorisation.items()))
    console.print(f"Generator [bold]{result.version}[/bold]: {result.bundle_uri} (card.md, samples.png)")
    console.print(f"Synthetic dataset: {result.count} {escape(result.synthetic_class)} image(s) in {result.dataset_uri}; "
                  f"train with: cxr-screen train DATASET --synthetic {escape(result.dataset_uri)} --seed {params.seed}" +
                  ("" if params.test_fraction == SynthesizeParameters.default("test_fraction")
                   else f" --test-fraction {params.test_fraction!r}"))
    if as_json:
        print_json({"version": result.version, "bundle_uri": result.bundle_uri, "dataset_uri": result.dataset_uri,
                    "manifest_uri": result.manifest_uri, "class": result.synthetic_class, "count": result.count,
                    "quality": result.quality.to_dict()})
