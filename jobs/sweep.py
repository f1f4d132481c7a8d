"""Ray Tune sweep over alpha, omega1, omega2 and T_bg on an existing pseudo-label bank, tracked in MLflow.

    python jobs/sweep.py tune_spaces/synthetic.yaml [--source OUTPUT] [--output SWEEP_OUTPUT] [section.key=value ...]

--source is a run_all output whose bank the trials reuse (default outputs/<preset>); the sweep writes
SWEEP_OUTPUT/best.yaml, which `python jobs/run_all.py --config SWEEP_OUTPUT/best.yaml` runs in full.
Rerunning the same command after the driver died resumes the sweep without rerunning finished trials.
"""

import argparse
import json
import logging
import os

from transfgu_dist.config import ConfigError, load_config
from transfgu_dist.io import storage
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.io.weights import EncoderLoadError, resolve_encoder
from transfgu_dist.pipeline.cli import ask_for_token_auth, help_epilog, ray_console, user_error
from transfgu_dist.pipeline.failures import Reported
from transfgu_dist.pipeline.interrupt import ctrl_c


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog()
    )
    parser.add_argument("space", help="search-space YAML (tune_spaces/*.yaml)")
    parser.add_argument("--source", help="run output holding the pseudo-label bank (default outputs/<preset>)")
    parser.add_argument("--output", help="sweep output (default <source>/sweeps/<space file name>)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration error")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress on the console")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the base config")
    args = parser.parse_intermixed_args(argv)
    if not args.verbose:
        ask_for_token_auth(args.address)
    try:  # every mistake before Ray starts
        from transfgu_dist.io.datasets import has_labels
        from transfgu_dist.pipeline import contract, settings_guard
        from transfgu_dist.pipeline.preflight import check_writable
        from transfgu_dist.pipeline.sweep import load_spec, with_params

        spec = load_spec(args.space)
        base = load_config(overrides=args.overrides, preset=spec.preset)
        source = args.source or f"outputs/{spec.preset}"
        base.source = source if "://" in source else os.path.abspath(source)
        if not has_labels(base):
            raise ConfigError(
                f"data.layout={base.data.layout}: a sweep ranks trials by val mIoU, and these images have no labels"
            )
        if not contract.output(base, "pseudo_label").is_committed():
            raise ConfigError(
                f"--source {base.source}: no committed pseudo-label bank (bank/_SUCCESS.json); run "
                f"jobs/run_all.py with output={source} first"
            )
        # the encoder run_all used: the demo's random fallback where DINO weights cannot be loaded
        base.encoder = resolve_encoder(base.encoder)
        settings_guard.check(base, ["pseudo_label"])  # the bank and what it was made from, made with these settings
        name = os.path.splitext(os.path.basename(args.space))[0]
        output = args.output or storage.join(base.source, "sweeps", name)
        base.output = output if "://" in output else os.path.abspath(output)
        check_writable("--output", base.output)
        trial = with_params(base, spec.trial, f"{args.space}: trial")
    except (ConfigError, StorageError, EncoderLoadError) as e:
        user_error(args, e)
    from transfgu_dist.pipeline.sweep import run_sweep

    kept = f"the finished trials under {base.output} (a rerun resumes the sweep)"
    with Reported(args.debug, "sweep"), ctrl_c(lambda: kept, argv), ray_console(args):
        summary = run_sweep(spec, base, trial, base.output)
    print(json.dumps(summary, indent=2, default=str))
    print(f"best config: {storage.join(base.output, 'best.yaml')}")
    return summary


if __name__ == "__main__":
    main()
