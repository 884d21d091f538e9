"""report.md of `mogelm compare`, rendered from its summary dict (plain text, no plotting here).

The sentences that interpret results are computed from the numbers (which model's loss is
lower, by how much, whether MoGE's IS is exactly zero), never written in advance.
"""

from __future__ import annotations


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(summary: dict) -> str:
    rows = [
        "| model | final val loss | val ppl | IS@8 mean | IS@8 max | IS@4 mean | IS@4 max "
        "| busiest/mean @8 (mean, max) | busiest expert | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, m in summary["models"].items():
        d8, d4 = m["devices"].get("8", {}), m["devices"].get("4", {})
        rows.append(
            f"| {r} | {m['final_val_loss']:.4f} | {m['final_val_ppl']:.1f} | {_fmt(d8.get('is_mean'))} | "
            f"{_fmt(d8.get('is_max'))} | {_fmt(d4.get('is_mean'))} | {_fmt(d4.get('is_max'))} | "
            f"{_fmt(d8.get('busiest_over_mean_mean'))}, {_fmt(d8.get('busiest_over_mean_max'))} | "
            f"{100 * m['busiest_expert_share']:.1f} % | {_fmt((m.get('train_s') or 0) / 60, '.1f')} min |"
        )
    return "\n".join(rows)


def _findings(summary: dict) -> list[str]:
    models = summary["models"]
    M, N, K = summary["num_groups"], summary["num_experts"], summary["active_experts"]
    out = []
    if "moge" in models and len(models) == 2:
        base = next(r for r in models if r != "moge")
        a, b = models["moge"]["final_val_loss"], models[base]["final_val_loss"]
        diff = b - a
        lower = "MoGE" if diff > 0 else base
        verdict = (
            "a difference this small is within what another seed could change, so read it as 'comparable'"
            if abs(diff) < 0.05 else
            "one seed and one short run, so the size of the gap is uncertain, but it is well beyond a few "
            "hundredths"
        )
        out.append(
            f"Final validation loss: MoGE {a:.4f}, {base} {b:.4f}; {lower} is lower by {abs(diff):.4f} nats "
            f"({100 * abs(diff) / max(a, b):.1f} %): {verdict}."
        )
        if base == "topk":
            out.append(
                "Gate weights differ by design: MoGE keeps the global-softmax probabilities of its chosen "
                "experts (not renormalised, as in Pangu Pro MoE, so at initialisation they sum to about "
                f"K/N = {K}/{N} of the mass), while top-k (paper Eq. 2) renormalises over the chosen K. "
                "`mogelm compare --baseline softmax_topk` gives a twin whose gates are not renormalised "
                "either."
            )
        for P in ("8", "4"):
            dm, db = models["moge"]["devices"].get(P), models[base]["devices"].get(P)
            if dm and db:
                if dm["is_max"] == 0:
                    exact = ("exactly 0 on every step and layer (every device gets the same number of expert "
                             "calls)")
                elif int(P) > M:
                    exact = (f"mean {dm['is_mean']:.3f}: with {P} devices and only {M} groups a device holds "
                             "part of a group, where MoGE guarantees nothing")
                else:
                    exact = f"mean {dm['is_mean']:.3f}"
                out.append(
                    f"{P} simulated devices: MoGE's Imbalance Score is {exact}; {base}'s is "
                    f"{db['is_mean']:.3f} on average and up to "
                    f"{db['is_max']:.3f}, so its busiest device does {db['busiest_over_mean_mean']:.2f}x the "
                    f"mean work at {P} devices on an average step (up to {db['busiest_over_mean_max']:.2f}x)."
                    if P == "8" else
                    f"{P} simulated devices: MoGE {exact}; {base} mean {db['is_mean']:.3f}, "
                    f"max {db['is_max']:.3f}."
                )
        wg = summary.get("max_within_group_coactivation", {})
        if "moge" in wg:
            out.append(
                f"Co-activation inside a MoGE group is {100 * wg['moge']:.1f} % at most (two experts of one "
                f"group never fire for the same token); for {base} the same expert pairs reach "
                f"{100 * wg.get(base, float('nan')):.1f} %."
            )
    return out


def render(summary: dict) -> str:
    E, M, K = summary["num_experts"], summary["num_groups"], summary["active_experts"]
    any_model = next(iter(summary["models"].values()))
    lines = [
        "# MoGE vs top-k MoE: training comparison",
        "",
        f"Produced by `{summary['command']}` on {summary['date']} ({summary['machine']}).",
        f"Wall time of the whole job (tokenizer, two trainings, report): "
        f"**{summary['wall_s'] / 60:.1f} min**.",
        "",
        f"Both models: preset `{summary['preset']}`, {summary['parameters'] / 1e6:.1f} M parameters "
        f"({summary['active_parameters'] / 1e6:.1f} M active per token), {E} routed experts, "
        f"{K} active per token "
        f"(MoGE: {M} groups of {E // M}, one expert per group), plus a shared expert. Same data order, "
        f"{any_model['steps']} steps of {summary['tokens_per_step']:,} tokens "
        f"({any_model['tokens']:,} tokens), "
        "same schedule and seed (identical initial weights). Both use the paper's batch-level aux loss "
        "(alpha 1e-3).",
        "",
        "## Summary",
        "",
        table(summary),
        "",
        f"IS (paper Eq. 3) = (max - min device load) / tokens, computed for every training batch "
        f"({summary['tokens_per_step']:,} tokens) and every layer, experts placed on devices in contiguous "
        "blocks (MoGE: one or more whole groups per device). busiest/mean = the straggler factor of a step. "
        "Busiest expert: share of validation tokens routed to the most-used expert of any layer.",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in _findings(summary)],
        "",
        "## Validation loss",
        "",
        "![validation loss](val_loss.png)",
        "",
        "## Imbalance Score per layer over training (8 and 4 simulated devices)",
        "",
        "![imbalance](imbalance.png)",
        "",
        "## Per-expert load, layers x experts (analogue of the paper's Fig. 7 and 10)",
        "",
        "Share of validation tokens routed to each expert at the end of training.",
        "",
        "![expert load](expert_load.png)",
        "",
        "## MoGE: load inside each group (analogue of Fig. 9)",
        "",
        "Each bar is an expert's share of its group's tokens; with one expert chosen per group the "
        f"uniform share is {100 / (E // M):.0f} %.",
        "",
        "![intra-group load](intra_group.png)",
        "",
        "## Expert co-activation (analogue of Fig. 8)",
        "",
        "Probability (over validation tokens) that two experts are both chosen for the same token.",
        "",
        "![co-activation](coactivation.png)",
        "",
    ]
    return "\n".join(lines)
