"""Free-running decoding shared by translation and captioning: greedy and batched beam search.

Both functions drive any model that implements :class:`IncrementalDecoder`:

- ``step(tokens, state)`` feeds one token per row (``tokens``: LongTensor [rows]) and returns
  ``(log_probs, new_state)`` or ``(log_probs, new_state, attention)``. ``log_probs`` [rows, vocab]
  must be normalised log-probabilities (apply ``log_softmax``). The optional third value is this
  step's attention weights [rows, src_len]; when a decoder returns it, ``return_attention=True``
  collects one row of weights per decoding step of every returned hypothesis.
- ``reorder_state(state, index)`` returns the state whose row ``j`` is row ``index[j]`` of ``state``
  (``index``: LongTensor [M], any M: it repeats rows to make beams, reorders them after each step
  and drops the rows of finished sentences). Whatever the state is (tensor, tuple, dataclass),
  every per-row piece must be selected, encoder outputs and masks included.

Conventions (both functions):

- ``state`` holds one row per input (``batch_size`` rows); the first token fed is ``bos_id``.
- At most ``max_len`` steps are taken; ``<eos>`` counts as a step. A hypothesis that never emits
  ``<eos>`` is returned as it stands after ``max_len`` tokens (``finished`` False), never dropped.
- ``DecodeResult.tokens`` exclude ``<bos>`` and ``<eos>``; ``scores`` are the summed log-probs of the
  emitted tokens including ``<eos>`` when it was emitted.
- Rows of sentences that are finished are dropped from the batch (``reorder_state``), and the loop
  stops as soon as every sentence is finished. The only Python loop on the hot path is over time
  steps; all sentences x beams move through one ``[sentences * beam, ...]`` tensor.

Beam search (fairseq-style bookkeeping, best hypothesis only):

- Each step takes the top ``2 * beam`` of all ``beam * vocab`` extensions of a sentence's live
  beams, in two stages (top ``2 * beam`` tokens per beam, then top ``2 * beam`` of those per
  sentence; ``//`` on LongTensors recovers the beam, no float indices). Scores are summed in
  float64 so near-ties are not rounded together (beam 1 == greedy on real models).
- A candidate ending in ``<eos>`` is *finalised* only if it ranks among the top ``beam``; the best
  ``beam`` non-``<eos>`` candidates stay live. A sentence is finished once ``beam`` hypotheses have
  been finalised, or once no live beam can still beat its best finalised one (exact bound: scores
  only fall as tokens are added, and the length penalty is largest at ``max_len``).
- Finalised hypotheses are ranked by ``score / lp(length)`` (``length`` counts ``<eos>``), with
  ``OutputRules.length_norm``: ``gnmt``, the GNMT penalty ``lp = ((5 + length) / 6) ** alpha``
  (``alpha = OutputRules.length_penalty``; 0 ranks by raw log-prob); ``average``, ``lp = length``
  (mean log-prob per token); ``none``, ``lp = 1``. Live beams are ranked by raw log-prob, as in
  GNMT/fairseq.
- With ``beam_size=1`` this is exactly greedy decoding, whatever the length penalty
  (a finalised ``<eos>`` is then the argmax, and one finalised hypothesis finishes the sentence).

Output rules (:class:`OutputRules`, both functions, applied to ``log_probs`` before any choice;
``rules=None`` decodes the decoder's distribution as it is, for toy decoders whose ids are not an
rnnlab vocabulary's; every rnnlab task passes its rules):

- ``<pad>`` and ``<bos>`` are never emitted, nor ``<unk>`` unless ``allow_unk``: their log-probs
  are set to -inf, so the best allowed token is taken instead (people do not write ``<unk>``).
- ``block_ngram_repeat = n > 0`` (OpenNMT-py's ``-block_ngram_repeat``): a token that would make
  the hypothesis repeat an n-gram it already contains gets -inf. With history ``h`` (``<bos>``
  excluded), token ``w`` is blocked at step ``t`` when ``(h[t-n+1:t], w)`` equals some
  ``h[i:i+n]``; ``n = 1`` forbids any token already emitted. ``<eos>`` is never blocked (it has not
  occurred before). Greedy decoding applies the same block, so beam 1 == greedy still holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor


class IncrementalDecoder(Protocol):
    def step(self, tokens: Tensor, state: Any) -> tuple:
        """tokens [rows] -> (log_probs [rows, vocab], new_state[, attention [rows, src_len]])."""
        ...

    def reorder_state(self, state: Any, index: Tensor) -> Any:
        """Row j of the result is row index[j] of ``state`` (index: LongTensor [M])."""
        ...


@dataclass
class DecodeResult:
    """Best hypothesis per input, in input order."""

    tokens: list[list[int]]  # without <bos>/<eos>
    scores: list[float]  # summed log-probs (incl. <eos> when emitted)
    normalized_scores: list[float]  # what beam search ranked finished hypotheses by (== scores if no penalty)
    finished: list[bool]  # False: cut at max_len without <eos>
    # attention[i]: [len(tokens[i]) + finished[i], src_len], one row per decoding step (the last
    # row is the <eos> step when finished); src_len is the padded width the decoder attended over.
    attention: list[Tensor] | None = None


LengthNorm = Literal["gnmt", "average", "none"]
LENGTH_NORMS = ("gnmt", "average", "none")

# The special ids of every rnnlab vocabulary (rnnlab.data.vocab.Vocab: pad 0, unk 1, bos 2, eos 3).
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2


@dataclass(frozen=True)
class OutputRules:
    """What a decoded output may contain and how finished beam hypotheses are ranked (module
    docstring). The defaults here are the library's (no rule but the special-token mask); the
    training sections of params.yaml state the pipeline's (README "Decoding rules")."""

    allow_unk: bool = False  # True: <unk> may be emitted (<pad>/<bos> never are)
    block_ngram_repeat: int = 0  # 0: off; n: no n-gram twice in one hypothesis
    length_norm: LengthNorm = "gnmt"  # beam search only: gnmt | average | none
    length_penalty: float = 0.0  # GNMT alpha (length_norm gnmt only); 0 = raw log-prob

    def __post_init__(self) -> None:
        if self.block_ngram_repeat < 0:
            raise ValueError(f"block_ngram_repeat must be >= 0, got {self.block_ngram_repeat}")
        if self.length_norm not in LENGTH_NORMS:
            raise ValueError(f"length_norm must be one of {list(LENGTH_NORMS)}, got {self.length_norm!r}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")

    mask_specials: bool = True  # False: only NO_RULES (a raw decoder, ids of no rnnlab vocabulary)

    def banned_ids(self) -> list[int]:
        if not self.mask_specials:
            return []
        return [PAD_ID, BOS_ID] if self.allow_unk else [PAD_ID, UNK_ID, BOS_ID]

    def lp(self, length: int) -> float:
        """The divisor of a finished hypothesis' summed log-prob (``length`` counts ``<eos>``)."""
        if self.length_norm == "gnmt":
            return length_penalty_factor(length, self.length_penalty)
        if self.length_norm == "average":
            return float(max(length, 1))
        return 1.0


NO_RULES = OutputRules(mask_specials=False)


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def ngram_blocked(history: Tensor, n: int, vocab_size: int) -> Tensor:
    """[rows, vocab] bool: the tokens that would repeat an n-gram of ``history`` [rows, t]."""
    rows, t = history.shape
    blocked = torch.zeros(rows, vocab_size, dtype=torch.bool, device=history.device)
    if n < 1 or t < n:  # no complete n-gram yet: nothing can repeat
        return blocked
    windows = history.unfold(1, n, 1)  # [rows, t - n + 1, n]: every n-gram so far
    prefix = history[:, t - n + 1 :]  # [rows, n - 1]: the n-gram the next token would complete
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(dim=2)  # [rows, t - n + 1]
    counts = torch.zeros(rows, vocab_size, device=history.device)
    counts.scatter_add_(1, windows[:, :, n - 1], match.float())  # scatter_add: duplicates add up
    return counts > 0


def apply_rules(log_probs: Tensor, history: Tensor, rules: OutputRules) -> Tensor:
    """``log_probs`` [rows, vocab] with the banned specials and blocked n-gram repeats at -inf."""
    banned = rules.banned_ids()
    if banned:
        log_probs = log_probs.clone()
        log_probs[:, banned] = float("-inf")
    if rules.block_ngram_repeat:
        log_probs = log_probs.masked_fill(
            ngram_blocked(history, rules.block_ngram_repeat, log_probs.size(-1)), float("-inf")
        )
    return log_probs


def _find_device(state: Any) -> torch.device | None:
    """First tensor's device inside an arbitrary state (tensor / sequence / mapping / dataclass)."""
    if isinstance(state, Tensor):
        return state.device
    if isinstance(state, dict):
        items = list(state.values())
    elif isinstance(state, (tuple, list)):
        items = list(state)
    elif dataclasses.is_dataclass(state):
        items = [getattr(state, f.name) for f in dataclasses.fields(state)]
    else:
        items = list(getattr(state, "__dict__", {}).values())
    for item in items:
        device = _find_device(item)
        if device is not None:
            return device
    return None


def _step(decoder: IncrementalDecoder, tokens: Tensor, state: Any) -> tuple[Tensor, Any, Tensor | None]:
    out = decoder.step(tokens, state)
    if len(out) == 2:
        return out[0], out[1], None
    if len(out) == 3:
        return out
    raise TypeError(f"decoder.step must return 2 or 3 values, got {len(out)}")


def _top_tokens(log_probs: Tensor, beam_size: int) -> tuple[Tensor, Tensor]:
    """Best min(2 * beam, vocab) tokens per row, best first: [rows, n] log-probs and token ids."""
    return log_probs.topk(min(2 * beam_size, log_probs.size(-1)), dim=-1)


def _check_args(batch_size: int, max_len: int, beam_size: int = 1) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")


def _result(
    tokens: Tensor, lengths: Tensor, scores: Tensor, norm: Tensor, finished: Tensor, attention: Tensor | None
) -> DecodeResult:
    lengths_list = lengths.tolist()
    finished_list = [bool(f) for f in finished.tolist()]
    rows = tokens.tolist()
    attn = None
    if attention is not None:
        attn = [attention[i, : n + f].cpu() for i, (n, f) in enumerate(zip(lengths_list, finished_list))]
    return DecodeResult(
        tokens=[row[:n] for row, n in zip(rows, lengths_list)],
        scores=scores.tolist(),
        normalized_scores=norm.tolist(),
        finished=finished_list,
        attention=attn,
    )


@torch.no_grad()
def greedy_decode(
    decoder: IncrementalDecoder,
    state: Any,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    max_len: int,
    return_attention: bool = False,
    device: torch.device | str | None = None,
    rules: OutputRules | None = None,
) -> DecodeResult:
    """Pick the most probable allowed token at every step (see the module docstring)."""
    _check_args(batch_size, max_len)
    rules = rules or NO_RULES
    device = torch.device(device) if device is not None else (_find_device(state) or torch.device("cpu"))
    out_tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
    out_len = torch.zeros(batch_size, dtype=torch.long, device=device)
    out_score = torch.zeros(batch_size, dtype=torch.float64, device=device)
    out_finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    out_attn: Tensor | None = None

    active = torch.arange(batch_size, device=device)  # sentence id of each live row
    history = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [rows, t]
    attn_history: Tensor | None = None  # [rows, t, src_len]
    score = torch.zeros(batch_size, dtype=torch.float64, device=device)  # float64: see beam_search
    prev = torch.full((batch_size,), bos_id, dtype=torch.long, device=device)
    for t in range(max_len):
        log_probs, state, attn = _step(decoder, prev, state)  # log_probs: [rows, vocab]
        log_probs = apply_rules(log_probs, history, rules)
        top_lp, top_tok = _top_tokens(log_probs, 1)  # the same call beam search makes for beam 1
        best_lp, best = top_lp[:, 0], top_tok[:, 0]  # [rows] each
        score = score + best_lp.double()
        history = torch.cat([history, best.unsqueeze(1)], dim=1)
        if return_attention and attn is not None:
            step_attn = attn.unsqueeze(1)  # [rows, 1, src_len]
            attn_history = step_attn if attn_history is None else torch.cat([attn_history, step_attn], dim=1)
            if out_attn is None:
                out_attn = torch.zeros(batch_size, max_len, attn.size(-1), device=device)
        ended = best == eos_id
        done = ended if t < max_len - 1 else torch.ones_like(ended)
        if done.any():
            rows = done.nonzero().squeeze(1)
            ids = active[rows]
            out_tokens[ids, : t + 1] = history[rows]
            out_len[ids] = t + 1 - ended[rows].long()
            out_score[ids] = score[rows]
            out_finished[ids] = ended[rows]
            if attn_history is not None:
                out_attn[ids, : t + 1] = attn_history[rows]
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, history, score, best = active[keep], history[keep], score[keep], best[keep]
            if attn_history is not None:
                attn_history = attn_history[keep]
            state = decoder.reorder_state(state, keep)
        prev = best
    return _result(out_tokens, out_len, out_score, out_score.clone(), out_finished, out_attn)


@torch.no_grad()
def beam_search(
    decoder: IncrementalDecoder,
    state: Any,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    max_len: int,
    length_penalty: float | None = None,
    return_attention: bool = False,
    device: torch.device | str | None = None,
    rules: OutputRules | None = None,
) -> DecodeResult:
    """Batched beam search over all sentences at once (see the module docstring).

    ``length_penalty`` (the GNMT alpha), when given, overrides ``rules.length_penalty``."""
    _check_args(batch_size, max_len, beam_size)
    rules = rules or NO_RULES
    if length_penalty is not None:
        rules = dataclasses.replace(rules, length_penalty=length_penalty)
    device = torch.device(device) if device is not None else (_find_device(state) or torch.device("cpu"))
    k = beam_size
    neg_inf = float("-inf")

    # Best finalised (or, at the end, live) hypothesis per sentence, indexed by sentence id.
    best_tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
    best_len = torch.zeros(batch_size, dtype=torch.long, device=device)
    best_raw = torch.full((batch_size,), neg_inf, dtype=torch.float64, device=device)
    best_norm = torch.full((batch_size,), neg_inf, dtype=torch.float64, device=device)
    best_finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    best_attn: Tensor | None = None  # [batch, max_len, src_len]

    # Live beams of the active sentences: beam j of active sentence a is row a * k + j.
    active = torch.arange(batch_size, device=device)
    state = decoder.reorder_state(state, active.repeat_interleave(k))
    scores = torch.zeros(batch_size, k, dtype=torch.float64, device=device)
    scores[:, 1:] = neg_inf  # all beams start identical: let only beam 0 expand at the first step
    history = torch.zeros(batch_size, k, 0, dtype=torch.long, device=device)  # [active, k, t]
    attn_history: Tensor | None = None  # [active, k, t, src_len]
    n_final = torch.zeros(batch_size, dtype=torch.long, device=device)
    prev = torch.full((batch_size * k,), bos_id, dtype=torch.long, device=device)
    lp_max = rules.lp(max_len)

    for t in range(max_len):
        log_probs, state, attn = _step(decoder, prev, state)  # log_probs: [active * k, vocab]
        n_active = active.numel()
        log_probs = apply_rules(log_probs, history.reshape(n_active * k, t), rules)
        # Two-stage top-k: the best 2k extensions of a sentence are among the best 2k of each beam.
        beam_lp, beam_tok = _top_tokens(log_probs, k)  # [active * k, per_beam], best first
        per_beam = beam_lp.size(-1)
        # Scores accumulate in float64: adding a float32 log-prob to a large float32 sum would round
        # near-ties together and make beam search disagree with greedy decoding.
        cand = (scores.unsqueeze(2) + beam_lp.view(n_active, k, per_beam).double()).view(n_active, k * per_beam)
        n_cand = min(2 * k, k * per_beam)
        # Stable sort (not topk): on exact ties the candidate from the better beam / token comes first,
        # as in greedy decoding, so beam 1 == greedy even for degenerate (untrained) models.
        top_scores, top_idx = cand.sort(dim=1, descending=True, stable=True)
        top_scores, top_idx = top_scores[:, :n_cand], top_idx[:, :n_cand]  # [active, n_cand]
        top_beam = top_idx // per_beam  # LongTensor floor division: which live beam was extended
        top_tok = beam_tok.view(n_active, k * per_beam).gather(1, top_idx)
        is_eos = top_tok == eos_id
        if attn is not None and return_attention and best_attn is None:
            best_attn = torch.zeros(batch_size, max_len, attn.size(-1), device=device)
        arange_active = torch.arange(n_active, device=device)

        # Finalise <eos> candidates ranked among the top k; all share length t + 1 (with <eos>).
        fin = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
        if fin.any():
            fin_scores = torch.where(fin, top_scores[:, :k], torch.full_like(top_scores[:, :k], neg_inf))
            cand_raw, cand_pos = fin_scores.max(dim=1)  # [active]
            cand_norm = cand_raw / rules.lp(t + 1)
            better = cand_norm > best_norm[active]
            if better.any():
                rows = better.nonzero().squeeze(1)
                ids = active[rows]
                beam = top_beam[rows, cand_pos[rows]]
                best_tokens[ids, :t] = history[rows, beam]
                best_len[ids] = t
                best_raw[ids] = cand_raw[rows]
                best_norm[ids] = cand_norm[rows]
                best_finished[ids] = True
                if best_attn is not None:
                    if t > 0:
                        best_attn[ids, :t] = attn_history[rows, beam]
                    best_attn[ids, t] = attn[rows * k + beam]
            n_final = n_final + fin.sum(dim=1)

        # Continue with the k best non-<eos> candidates (there are at least k among the 2k).
        rank = is_eos.long() * n_cand + torch.arange(n_cand, device=device)  # non-eos first, in score order
        order = rank.argsort(dim=1)[:, :k]  # [active, k]
        scores = top_scores.gather(1, order)
        beam_origin = top_beam.gather(1, order)
        next_tok = top_tok.gather(1, order)
        history = torch.cat(
            [history.gather(1, beam_origin.unsqueeze(2).expand(-1, -1, t)), next_tok.unsqueeze(2)], dim=2
        )
        source_rows = arange_active.unsqueeze(1) * k + beam_origin  # [active, k]: row of the step output
        if best_attn is not None:
            step_attn = attn[source_rows.view(-1)].view(n_active, k, 1, -1)
            if attn_history is None:
                attn_history = step_attn
            else:
                src_len = attn_history.size(-1)
                gathered = attn_history.gather(1, beam_origin[:, :, None, None].expand(-1, -1, t, src_len))
                attn_history = torch.cat([gathered, step_attn], dim=2)

        if t == max_len - 1:
            # Out of steps: a live beam competes with the finalised ones at length max_len (no <eos>).
            live_raw, live_pos = scores.max(dim=1)
            live_norm = live_raw / lp_max
            take = (live_norm > best_norm[active]) | ~torch.isfinite(best_norm[active])
            rows = take.nonzero().squeeze(1)
            if rows.numel():
                ids = active[rows]
                best_tokens[ids] = history[rows, live_pos[rows]]
                best_len[ids] = max_len
                best_raw[ids] = live_raw[rows]
                best_norm[ids] = live_norm[rows]
                best_finished[ids] = False
                if best_attn is not None:
                    best_attn[ids] = attn_history[rows, live_pos[rows]]
            break

        # A sentence is done with k finalised hypotheses, or when no live beam can beat its best.
        have_best = torch.isfinite(best_norm[active])
        done = (n_final >= k) | (have_best & (best_norm[active] >= scores[:, 0] / lp_max))
        keep = (~done).nonzero().squeeze(1) if done.any() else arange_active
        if keep.numel() == 0:
            break
        active, scores, history, n_final = active[keep], scores[keep], history[keep], n_final[keep]
        if attn_history is not None:
            attn_history = attn_history[keep]
        next_tok = next_tok[keep]
        state = decoder.reorder_state(state, source_rows[keep].reshape(-1))
        prev = next_tok.reshape(-1)
    return _result(best_tokens, best_len, best_raw, best_norm, best_finished, best_attn)
