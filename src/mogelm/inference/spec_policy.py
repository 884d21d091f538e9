"""When to speculate and with how many drafts: a fixed batch threshold, or a cost-aware rule that
measures what speculation earns on this model, this device and this traffic.

    policy = FixedSpecPolicy(k=3, max_batch=64)        # drafts k while at most 64 sequences run
    policy = AdaptiveSpecPolicy(k=3, max_batch=256)    # measures, then picks 0..k per batch size
    k_now = policy.choose(num_running)                 # before a step: drafts per sequence (0: off)
    policy.record(num_running, k_now, seconds, rows, accepted)   # after a decode-only step

Why measure. A verify step computes k + 1 positions per sequence and yields 1 + (accepted
drafts) tokens. Whether that pays depends on quantities no formula here knows well: at small
batch a step is bound by reading the weights and the extra positions are nearly free; at large
batch it is bound by compute and the expert kernels see (k + 1)x the rows; the engine's host work
per draft (drafting, the accept rule, rollback) weighs more the smaller the model; and the
acceptance rate depends on the text. On one H200 (benchmarks/README.md, "Speculative decoding")
n-gram drafts won 2.1-2.2x at batch 1 on a 1 B model and lost from batch 16, where the 72B layout
is predicted to gain through 64 — so a fixed threshold is right for one model at best.

The adaptive rule. Batch sizes fall into power-of-two buckets. For each bucket and each draft
length j = 0..k it keeps the last few wall times of a decode-only step per running sequence
(host work included; prefill and mixed steps are not comparable and not recorded) and uses their
median, so one slow step moves it little; for each j it keeps a moving average of the tokens a
decoding sequence gets per step (1 + accepted drafts / rows, so sequences for which the drafter
found nothing count too; j = 0 gives exactly 1; a step with j drafts also tells what every
shorter length would have yielded, drafts being prefixes of each other). Before a step it picks
the j with the most tokens per second, tokens(j) / time(bucket, j).
- Exploring a new bucket: j = 0, 1, 2, ... each for `explore_steps` recorded steps, stopping at the
  first length that loses by more than 20 % to the best so far (at large batch a verify step costs
  2-3 plain ones: longer drafts would cost more still); an option that loses by more than 40 %
  after one step is not sampled again then.
- Afterwards the best length's neighbours (best - 1, best + 1) are measured again, so a change in
  the traffic (acceptance falls, the batch grows) is noticed: one within 20 % of the best every
  `explore_every` recorded steps, one clearly worse half as often each time it loses again (down to
  1 in 16 rounds). That costs a few percent of the steps at worst, less over a long run.
- Costs measured at different times are compared through the drift of the settled choice: each
  step of it that moves its median scales the other lengths' stored costs by the same factor
  (during a generation every step grows slower as the contexts grow; without this an option
  measured early would look cheap forever).

Determinism. The choice depends on measured times, so two runs of the same requests may speculate
on different steps. Greedy output does not change (speculation never changes a greedy token);
a seeded sampled request keeps the target distribution but draws its random numbers at other
steps, so its text can differ between runs. Use the fixed policy where seeded sampling must
repeat exactly. The lockstep (multi-process) engine never speculates (commands/_lockstep.py):
ranks timing their steps would choose differently and run mismatched collectives.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("auto", "fixed")


def batch_bucket(num_running: int) -> int:
    """The power of two at or above num_running (1, 2, 4, ...)."""
    return 1 << max(num_running - 1, 0).bit_length()


class FixedSpecPolicy:
    """k drafts while at most max_batch sequences run, none above."""

    def __init__(self, k: int, max_batch: int):
        self.k, self.max_batch = k, max_batch

    def choose(self, num_running: int) -> int:
        return self.k if num_running <= self.max_batch else 0

    def record(self, num_running: int, k: int, seconds: float, rows: int, accepted: int) -> None:
        pass

    def table(self) -> dict:
        return {}


@dataclass
class _Option:
    """What one draft length costs at one batch bucket."""
    recent: deque = field(default_factory=lambda: deque(maxlen=5))  # seconds per sequence-step
    samples: int = 0
    last_step: int = -1  # the bucket's step count when last recorded
    interval: int = 0  # steps between re-measurements (doubles while the option keeps losing)

    @property
    def seconds_per_seq(self) -> float | None:
        """The median of the recent samples: one slow step (a collection, a first replay) moves it
        little, a real change in cost moves it within a few steps."""
        return statistics.median(self.recent) if self.recent else None


@dataclass
class _Bucket:
    options: dict[int, _Option] = field(default_factory=dict)
    steps: int = 0  # recorded decode-only steps
    exploring: int | None = None  # the draft length being tried
    explore_left: int = 0  # recorded steps still wanted for it
    explore_tries: int = 0  # choose() calls spent on it (gives up on an option that never records)
    pruned_above: int | None = None  # first exploration: longer drafts than this are not tried


class AdaptiveSpecPolicy:
    """The cost-aware rule of the module docstring."""

    PRUNE = 0.8  # first exploration: an option below this share of the best rate ends the search upwards
    GIVE_UP = 0.6  # an option below this share of the best rate after one sample is not sampled again now
    BACK_OFF = 0.8  # a neighbour below this share of the best rate is re-measured less and less often

    def __init__(self, k: int, max_batch: int, explore_every: int = 32, explore_steps: int = 2,
                 alpha: float = 0.2):
        self.k, self.max_batch = k, max_batch
        self.explore_every, self.explore_steps, self.alpha = explore_every, explore_steps, alpha
        self.buckets: dict[int, _Bucket] = {}
        self.tokens = {0: 1.0}  # draft length -> moving average of tokens per decoding sequence and step

    # --- choosing ---------------------------------------------------------------------------------
    def choose(self, num_running: int) -> int:
        if num_running > self.max_batch or num_running == 0:
            return 0
        b = self.buckets.setdefault(batch_bucket(num_running), _Bucket())
        if b.exploring is not None:
            b.explore_tries += 1
            if b.explore_left > 0 and b.explore_tries <= 4 * self.explore_steps:
                return b.exploring
            b.exploring = None
        for j in range(self.k + 1):  # first exploration: 0, 1, 2, ... until a length stops paying
            if b.pruned_above is not None and j > b.pruned_above:
                break
            if j not in b.options:
                return self._explore(b, j)
        best = self._best(b)
        # now and then measure the neighbours of the best length again (local search over 0..k);
        # a neighbour that keeps losing clearly is measured half as often each time, down to 1 in 16
        # rounds (at large batch a verify step costs 2-3 plain ones); a close one every round
        for j in (best + 1, best - 1):
            o = b.options.get(j)
            due = o is None or b.steps - o.last_step >= max(o.interval, self.explore_every)
            if 0 <= j <= self.k and due:
                return self._explore(b, j)
        return best

    def _explore(self, b: _Bucket, j: int) -> int:
        b.options.setdefault(j, _Option())
        b.exploring, b.explore_left, b.explore_tries = j, self.explore_steps, 1
        return j

    def _rate(self, b: _Bucket, j: int) -> float:
        """Tokens per second per sequence of draft length j at this bucket (0 when unmeasured)."""
        o = b.options.get(j)
        if o is None or o.seconds_per_seq is None:
            return 0.0
        return self.tokens.get(j, 1.0) / max(o.seconds_per_seq, 1e-12)

    def _best(self, b: _Bucket) -> int:
        return max(sorted(b.options), key=lambda j: self._rate(b, j))  # ties: the fewest drafts

    # --- recording --------------------------------------------------------------------------------
    def record(self, num_running: int, k: int, seconds: float, rows: int,
               accepted: list[int] | int = 0) -> None:
        """One decode-only step that ran with draft length k: its wall time, its decoding sequences
        (rows) and, for each shorter-or-equal draft length j = 1..k, the drafts the rows would have
        accepted with only j drafts: accepted[j - 1] = sum over rows of min(accepted, j) (drafts are
        prefixes of each other, so a step with k drafts tells what 1..k-1 would have yielded; an int
        is the total for k alone). Steps where the drafter found nothing count (their cost is real);
        the engine leaves out MTP's first step after a pause, which has no draft yet."""
        if rows <= 0:
            return
        b = self.buckets.setdefault(batch_bucket(num_running), _Bucket())
        o = b.options.setdefault(k, _Option())
        before = o.seconds_per_seq
        o.recent.append(seconds / rows)
        if b.exploring != k and before:
            # the settled choice's cost drifts (contexts grow, the batch within the bucket changes):
            # the others' costs, measured earlier, move with it; only the measured ratios are kept
            drift = o.seconds_per_seq / before
            for j, other in b.options.items():
                if j != k:
                    other.recent = deque((t * drift for t in other.recent), maxlen=other.recent.maxlen)
        o.samples += 1
        b.steps += 1
        o.last_step = b.steps
        if isinstance(accepted, int):
            accepted = [accepted] if k == 1 else ([] if k == 0 else [None] * (k - 1) + [accepted])
        for j, acc in enumerate(accepted, start=1):
            if acc is not None:
                t, old = 1.0 + acc / rows, self.tokens.get(j)
                self.tokens[j] = t if old is None else (1 - self.alpha) * old + self.alpha * t
        best = self._best(b)
        if b.exploring == k:
            b.explore_left -= 1
            if self._rate(b, k) < self.GIVE_UP * self._rate(b, best):
                b.explore_left = 0  # clearly worse: one sample is enough for now
            if b.explore_left <= 0:
                b.exploring = None
                if b.pruned_above is None and k > 0 and self._rate(b, k) < self.PRUNE * self._rate(b, best):
                    b.pruned_above = k  # first exploration: longer drafts would cost more still
                if k != best and self._rate(b, k) < self.BACK_OFF * self._rate(b, best):
                    # clearly worse: measured half as often each time (what re-measuring costs)
                    o.interval = min(2 * max(o.interval, self.explore_every), 16 * self.explore_every)
                elif k != best:  # close to the best: cheap to re-measure and may win as the text changes
                    o.interval = self.explore_every
        if k == best:
            o.interval = 0
        if b.pruned_above is None and all(j in b.options for j in range(self.k + 1)):
            b.pruned_above = self.k  # every length measured once

    def table(self) -> dict:
        """{bucket: {draft length: (ms per sequence-step, tokens per sequence-step, samples)}} and the
        choice at each bucket now (benchmarks and /metrics read this)."""
        out = {}
        for size, b in sorted(self.buckets.items()):
            rows = {j: (None if o.seconds_per_seq is None else round(o.seconds_per_seq * 1e3, 4),
                        round(self.tokens.get(j, 1.0), 3), o.samples) for j, o in sorted(b.options.items())}
            out[size] = dict(options=rows, best=self._best(b) if b.options else None)
        return out


def make_policy(name: str, k: int, max_batch: int, **kw):
    if name not in POLICIES:
        raise ValueError(f"speculative policy must be one of {POLICIES}, got {name!r}")
    return AdaptiveSpecPolicy(k, max_batch, **kw) if name == "auto" else FixedSpecPolicy(k, max_batch)
