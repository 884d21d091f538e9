"""The accept rule of speculative decoding, as pure batched functions (no model, no cache).

After a drafter proposed d_1..d_k for a sequence, one target forward over [x_t, d_1, .., d_k]
gives k+1 next-token distributions p_1..p_{k+1} (p_i conditioned on the prefix through d_{i-1}).
The rule keeps a prefix of the drafts and adds one token from the target, so every verify step
emits between 1 and k+1 tokens:

    greedy (temperature 0):  accept d_i while d_i == argmax p_i; then the next token is
                             argmax p_{a+1} (a = number accepted): exactly what greedy decoding
                             without drafts would emit, token for token.
    sampled:                 accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), in order,
                             stopping at the first rejection; a rejection at i emits a sample of
                             norm(max(0, p_i - q_i)); if all k are accepted, emit a sample of
                             p_{k+1}. Every emitted token is then distributed exactly as sampling
                             from the target alone (Leviathan et al. 2023, Chen et al. 2023).

q_i is the draft model's distribution for d_i. Deterministic drafters (n-gram lookup, greedy MTP)
pass no q: q_i is then one-hot on d_i, the acceptance probability is p_i(d_i) and the residual is
p_i with d_i removed. That choice is exact for any way of choosing the drafts (given d_i, the
emitted token is d_i with probability p_i(d_i) and otherwise a sample of p_i restricted to the
other tokens, i.e. a sample of p_i), so it is also the safe choice when q is unknown.

p (and q) are the probabilities after the sampler's own transforms (temperature, top-k/top-p);
the caller computes them. Rows may carry fewer drafts than the batch's k (`num_draft_B`): drafts
past a row's count are ignored, and its bonus distribution is p at index num_draft.

    num_acc_B, next_B = accept_greedy(target_ids_BK1, draft_ids_BK)
    num_acc_B, next_B = accept_sampled(target_probs_BK1V, draft_ids_BK, draft_probs_BKV, generator=g)
    # row b emits draft_ids_BK[b, :num_acc_B[b]] followed by next_B[b]

Legend: B sequences, K drafts per sequence (the batch's k), K1 = K + 1, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _num_accepted(accept_BK: Tensor, num_draft_B: Tensor | None) -> Tensor:
    """Length of the all-accepted prefix of each row, counting only its first num_draft drafts."""
    B, K = accept_BK.shape
    if num_draft_B is not None:
        accept_BK = accept_BK & (torch.arange(K, device=accept_BK.device) < num_draft_B.unsqueeze(1))
    return accept_BK.long().cumprod(dim=1).sum(dim=1)  # [B]


def accept_greedy(target_ids_BK1: Tensor, draft_ids_BK: Tensor, num_draft_B: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Greedy verification. target_ids_BK1: argmax of the target at each of the k+1 positions.
    Returns (num_accepted [B], next token [B]): the target's token after the accepted prefix."""
    K = draft_ids_BK.shape[1]
    assert target_ids_BK1.shape[1] == K + 1, "need k+1 target tokens for k drafts"
    num_acc_B = _num_accepted(draft_ids_BK == target_ids_BK1[:, :K], num_draft_B)
    return num_acc_B, target_ids_BK1.gather(1, num_acc_B.unsqueeze(1)).squeeze(1)


def accept_sampled(
    target_probs_BK1V: Tensor,
    draft_ids_BK: Tensor,
    draft_probs_BKV: Tensor | None = None,
    num_draft_B: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled verification (the rule in the module docstring). Returns (num_accepted [B], next
    token [B]). draft_probs_BKV None: deterministic drafts (q one-hot on each draft)."""
    B, K1, V = target_probs_BK1V.shape
    K = draft_ids_BK.shape[1]
    assert K1 == K + 1, "need k+1 target distributions for k drafts"
    p = target_probs_BK1V.float()
    p_draft_BK = p[:, :K].gather(2, draft_ids_BK.unsqueeze(2)).squeeze(2)  # p_i(d_i)
    if draft_probs_BKV is None:
        q_draft_BK = torch.ones_like(p_draft_BK)
    else:
        q_draft_BK = draft_probs_BKV.float().gather(2, draft_ids_BK.unsqueeze(2)).squeeze(2)
    u_BK = torch.rand(B, K, generator=generator, device=p.device)
    # u < p/q, written without the division (q > 0 for a token the drafter could propose)
    num_acc_B = _num_accepted(u_BK * q_draft_BK < p_draft_BK, num_draft_B)

    rows = torch.arange(B, device=p.device)
    p_next_BV = p[rows, num_acc_B]  # p_{a+1}: the rejected position's, or the bonus one
    drafted_B = num_draft_B if num_draft_B is not None else torch.full_like(num_acc_B, K)
    rejected_B = num_acc_B < drafted_B
    if K > 0:
        at_B = num_acc_B.clamp(max=K - 1)
        if draft_probs_BKV is None:
            q_at_BV = torch.zeros_like(p_next_BV)
            q_at_BV[rows, draft_ids_BK[rows, at_B]] = 1.0
        else:
            q_at_BV = draft_probs_BKV.float()[rows, at_B]
        residual_BV = (p_next_BV - q_at_BV).clamp(min=0)
        # A rejection implies p_i(d) < q_i(d), so some other token has p > q and the residual is
        # not all zero; the guard only catches float round-off at that boundary.
        usable_B = rejected_B & (residual_BV.sum(1) > 0)
        p_next_BV = torch.where(usable_B.unsqueeze(1), residual_BV, p_next_BV)
    next_B = torch.multinomial(p_next_BV, 1, generator=generator).squeeze(1)  # normalises rows itself
    return num_acc_B, next_B
