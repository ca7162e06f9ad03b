"""`fleet-twin predict`: one instance, one model, a closed loop of N users, run on the real core.

Every user sends its next request the moment the last one completes (zero think time), which is
how published single-stream speeds and offline throughputs are measured. The run warms up until
every user has finished a request and the rates settle, then measures over a window of whole
request lifetimes. The numbers come from the same `twin.core.step` that runs the live fleet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from twin import core
from twin.build import assemble, instance_row
from twin.catalog import PRECISIONS, Catalog, ConfigError, fits
from twin.workload import LengthSpec, Workload, WorkloadSpec

KEYS = (
    "ttft_s",
    "tpot_s",
    "per_user_tokens_per_s",
    "aggregate_tokens_per_s",
    "power_w",
    "tokens_per_joule",
)


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    per_user_tokens_per_s: float
    aggregate_tokens_per_s: float
    power_w: float
    tokens_per_joule: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class PredictArgs:
    system: str
    chips: int
    model: str
    precision: str
    concurrency: int
    input_tokens: int
    output_tokens: int
    spec_decode: float | None = None


def validate(args: PredictArgs, catalog: Catalog) -> None:
    """Raise ConfigError (one line, naming the argument) for anything predict cannot run."""
    if args.system not in catalog.systems:
        raise ConfigError(
            f"--system: unknown system {args.system!r}; "
            f"expected one of {', '.join(catalog.systems)}"
        )
    if args.model not in catalog.models:
        raise ConfigError(
            f"--model: unknown model {args.model!r}; expected one of {', '.join(catalog.models)}"
        )
    if args.precision not in PRECISIONS:
        raise ConfigError(
            f"--precision: expected one of {', '.join(PRECISIONS)}, got {args.precision!r}"
        )
    for name in ("chips", "concurrency", "input_tokens", "output_tokens"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer")
    if args.spec_decode is not None and not 1.0 <= args.spec_decode <= 16.0:
        raise ConfigError("--spec-decode: expected tokens per iteration between 1 and 16")
    system = catalog.systems[args.system]
    model = catalog.models[args.model]
    ok, need, usable = fits(system, model, args.precision, args.chips)
    if not ok:
        raise ConfigError(
            f"--chips: {args.model} at {args.precision} needs {need / 1e9:.1f} GB of weights; "
            f"{args.chips} x {args.system} hold {usable / 1e9:.1f} GB usable"
        )
    kv_need = (args.input_tokens + args.output_tokens) * model.kv_bytes_per_token(args.precision)
    if kv_need > usable - need:
        raise ConfigError(
            f"--input-tokens/--output-tokens: one request needs {kv_need / 1e9:.2f} GB "
            "of KV cache; "
            f"{args.chips} x {args.system} have {(usable - need) / 1e9:.2f} GB left after weights"
        )


def build(args: PredictArgs, catalog: Catalog) -> tuple[core.Params, WorkloadSpec]:
    system = catalog.systems[args.system]
    model = catalog.models[args.model]
    row = instance_row(
        system,
        model,
        args.precision,
        args.chips,
        core.ROLE_UNIFIED,
        model_id=args.model,
        spec=args.spec_decode,
    )
    params = assemble(
        [row],
        [0],
        [core.ROLE_UNIFIED],
        [args.system],
        [],
        slo_ttft_s=np.inf,
        slo_tpot_s=np.inf,
        max_retries=0,
    )
    # one request's nominal lifetime at full concurrency: the users' start times are spread over it
    t_iter = row.t_fixed + max(
        row.weight_bytes / row.w_bw,
        args.concurrency * row.spec * row.flops_per_token / row.flops,
    )
    lifetime = args.output_tokens * t_iter / row.spec
    spec = WorkloadSpec(
        arrivals="closed",
        users=args.concurrency,
        stagger_s=lifetime,
        prompt=LengthSpec(dist="fixed", value=args.input_tokens),
        output=LengthSpec(dist="fixed", value=args.output_tokens),
    )
    return params, spec


def predict(args: PredictArgs, catalog: Catalog, *, seed: int = 0) -> Prediction:
    validate(args, catalog)
    params, spec = build(args, catalog)
    rng = np.random.default_rng(seed)
    c = args.concurrency
    state = core.new_state(
        params, Workload(spec, rng), rng, capacity=max(64, 2 * c), ring_size=max(4096, 16 * c)
    )
    max_dt = 0.5

    def run_completions(n: int) -> None:
        target = state.done + n
        while state.done < target:
            core.step(state, params, max_dt, adaptive=True)

    run_completions(2 * c)  # warm-up: every user through at least once, rates settled
    t0, e0 = state.t, float(state.inst_energy_j.sum())
    out0 = float(state.inst_output_tokens.sum())
    ring_n0 = state.done
    run_completions(max(3 * c, 12))
    window = state.t - t0
    n_new = state.done - ring_n0
    ring = state.ring
    idx = (ring.pos - 1 - np.arange(min(n_new, ring.n))) % ring.size
    ttft = float(np.median(ring.ttft[idx]))
    tpot = float(np.median(ring.tpot[idx]))
    tokens = float(state.inst_output_tokens.sum()) - out0
    energy = float(state.inst_energy_j.sum()) - e0
    return Prediction(
        ttft_s=ttft,
        tpot_s=tpot,
        per_user_tokens_per_s=1.0 / tpot if tpot > 0 else float("inf"),
        aggregate_tokens_per_s=tokens / window,
        power_w=energy / window,
        tokens_per_joule=tokens / energy if energy > 0 else 0.0,
    )
