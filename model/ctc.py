"""The CTC head, and joint CTC / LLM decoding with it.

SALMONN-tiny's training adds an auxiliary CTC loss (ours, not the paper's): each ASR clip's audio
tokens are pulled toward the LLM's own input embeddings of the words spoken in their window. The
head that scores them (a blank direction and a scale) is small, and a checkpoint may carry it.
With it, decoding can weigh each next token the LLM proposes by how well the audio tokens spell
the answer so far: joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/Attention
Architecture for End-to-End Speech Recognition"). The LLM keeps its language, the CTC path keeps
it to what was heard; it fits transcription prompts only (a story is no spelling of the audio).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor

# Log-prob of a non-blank label on a padding frame: finite, so cumulative sums stay exact
# (float64), yet no path through it ever counts.
_PAD = -1.0e4


class CTCHead(nn.Module):
    """Scores audio tokens against the LLM's (frozen) input embedding table, plus a blank.

    Cosine similarity times a learned scale: the CTC loss then steers only the *direction* of each
    audio token toward the embeddings of the words spoken in its window (so the frozen LLM reads it
    like text), leaving its norm to the LM loss."""

    def __init__(self, dim: int):
        super().__init__()
        self.blank = nn.Parameter(torch.randn(dim) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def unit_table(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The scored directions [V + 1, H]: the LLM's embeddings, then the blank, all unit length."""
        table = torch.cat([embeddings.detach().float(), self.blank[None].float().to(embeddings.device)])
        return nn.functional.normalize(table, dim=-1)

    def unit_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Audio tokens [T, H] at unit length times the scale: their dot products with `unit_table`
        are the scores."""
        return nn.functional.normalize(tokens.float(), dim=-1) * self.log_scale.exp().to(tokens.device)

    def forward(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unit_tokens(tokens) @ self.unit_table(embeddings).T

    @torch.no_grad()
    def frame_log_probs(self, audio: Sequence[torch.Tensor], embeddings: torch.Tensor) -> "FrameLogProbs":
        """Per-clip audio tokens [T_i, H] -> their frame log-probs over the vocabulary and blank."""
        return FrameLogProbs(self, audio, embeddings)


class DenseFrames:
    """Frame log-probs [B, T, V + 1] (blank last) held whole: small vocabularies, tests."""

    def __init__(self, log_probs: torch.Tensor):
        self.x = log_probs.double().cpu()
        self.blank = self.x[:, :, -1]                                        # [B, T]

    def labels(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Log-probs of labels[i] [N, K] in clip rows[i] at every frame: [N, K, T]."""
        return self.x[rows[:, None], :, labels]


class FrameLogProbs:
    """A CTC head's frame log-probs for B clips, computed for the labels asked.

    The whole [T, vocabulary] table of a 5-minute clip (1800 audio tokens x 49k tokens) would take
    0.7 GB in float64, yet decoding reads only the LLM's few candidate tokens per step; so only the
    scaled unit audio tokens and each frame's log-normaliser are kept. Frames past a clip's end
    emit blank with certainty."""

    def __init__(self, head: CTCHead, audio: Sequence[torch.Tensor], embeddings: torch.Tensor, chunk: int = 256):
        device = embeddings.device
        self.table = head.unit_table(embeddings)                                  # [V + 1, H], blank last
        rows, width = max(t.shape[0] for t in audio), self.table.shape[1]
        self.tokens = torch.zeros(len(audio), rows, width, device=device)
        self.norm = torch.zeros(len(audio), rows, dtype=torch.float64)
        self.blank = torch.zeros(len(audio), rows, dtype=torch.float64)
        self.valid = torch.zeros(len(audio), rows, dtype=torch.bool)
        for i, t in enumerate(audio):
            unit = head.unit_tokens(t.to(device))
            self.tokens[i, : len(t)] = unit
            for s in range(0, len(t), chunk):      # the normaliser needs every token's score, a chunk at a time
                part = unit[s:s + chunk]
                scores = part @ self.table.T
                norm = torch.logsumexp(scores.double(), -1).cpu()
                self.norm[i, s:s + len(part)] = norm
                self.blank[i, s:s + len(part)] = scores[:, -1].double().cpu() - norm
            self.valid[i, : len(t)] = True

    def labels(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Log-probs of labels[i] [N, K] in clip rows[i] at every frame: [N, K, T]."""
        emb = self.table[labels.to(self.table.device)]                              # [N, K, H]
        scores = torch.einsum("nth,nkh->nkt", self.tokens[rows.to(self.tokens.device)], emb).double().cpu()
        x = scores - self.norm[rows][:, None]
        return torch.where(self.valid[rows][:, None], x, _PAD)


class CTCPrefixScores:
    """CTC prefix probabilities of growing label sequences over fixed frame log-probs.

    For a prefix g the forward variables r_n[t], r_b[t] are the log-probs of having emitted exactly
    g by frame t, ending in its last label or in blank. Extending g by a label c gives
    psi(g + c) = log P(some labelling that starts with g + c); the end of the answer scores
    log(r_n[T-1] + r_b[T-1]), all of g and nothing more. Each recursion over frames is written with
    cumulative sums (r[t] = x[t] + logaddexp(r[t-1], phi[t-1]) unrolls into a log-cumsum-exp), so a
    step scores all (prefix, candidate) pairs in a few tensor operations."""

    def __init__(self, frames: "FrameLogProbs | DenseFrames | torch.Tensor"):
        self.frames = DenseFrames(frames) if isinstance(frames, torch.Tensor) else frames
        self.blank_cum = self.frames.blank.cumsum(-1)                          # [B, T]

    def initial(self, row: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(r_n, r_b, psi) of the empty prefix of clip `row`."""
        b = self.blank_cum[row]
        return torch.full_like(b, -math.inf), b.clone(), 0.0

    def extend(self, row: Sequence[int], r_n: torch.Tensor, r_b: torch.Tensor, last: Sequence[int],
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefixes (clip `row[i]`, forward variables r_n[i], r_b[i] [N, T], last label or -1 when
        empty) each extended by labels[i] [N, K]: returns r_n, r_b [N, K, T] and psi [N, K]."""
        rows = torch.as_tensor(list(row))
        x = self.frames.labels(rows, labels)                                  # [N, K, T]
        last_t = torch.as_tensor(list(last))
        either = torch.logaddexp(r_n, r_b)
        # a repeated label needs a blank between: only paths ending in blank may continue
        phi = torch.where((labels == last_t[:, None])[..., None], r_b[:, None], either[:, None])
        start = torch.where(last_t < 0, 0.0, -math.inf).double()              # empty prefix: may start at t = 0
        phi_prev = torch.cat([start[:, None, None].expand(-1, labels.shape[1], 1), phi[..., :-1]], -1)
        cum = x.cumsum(-1)
        new_n = cum + torch.logcumsumexp(phi_prev - (cum - x), -1)
        psi = torch.logsumexp(phi_prev + x, -1)
        bc = self.blank_cum[rows][:, None]                                    # [N, 1, T]
        before = torch.logcumsumexp(new_n - bc, -1)
        new_b = torch.cat([torch.full_like(before[..., :1], -math.inf), bc[..., 1:] + before[..., :-1]], -1)
        return new_n, new_b, psi


# The LLM's best tokens that CTC scores at each step. 8 (ESPnet's partial scoring) let the LLM veto the
# heard word whenever it ranked below its 8th guess; 64 took the everyday development set from 58.2 to 50.5 %
# WER at weight 0.5 (32: 51.9 %, 128: 50.8 %).
CANDIDATES = 64


class CTCGuide(LogitsProcessor):
    """Joint CTC / LLM scores for greedy or beam search over B clips x `rows_per_clip` rows (the beams
    of each clip, or several answers to one clip).

    Each row's next-token score becomes (1 - weight) x the LLM's log-prob + weight x the rise in the
    CTC prefix score; only the LLM's `candidates` best tokens (and EOS) are scored, every other token
    is ruled out (as ESPnet's partial scoring). Rows are matched to their prefixes by their tokens,
    so beams may be reordered freely, and one guide serves several searches over the same clips; a
    row past EOS passes through untouched."""

    def __init__(self, frames: "FrameLogProbs | DenseFrames | torch.Tensor", rows_per_clip: int, weight: float,
                 eos: int, candidates: int = CANDIDATES):
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"CTC weight must be in (0, 1], got {weight}")
        self.scores = CTCPrefixScores(frames)
        self.rows_per_clip, self.weight, self.eos, self.k = rows_per_clip, weight, eos, candidates
        self.states: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _mix(self, llm: torch.Tensor, ctc: torch.Tensor) -> torch.Tensor:
        """(1 - weight) x LLM log-prob + weight x CTC gain; a token either rules out stays out (even at weight 1)."""
        llm = llm.double().cpu()
        joint = (1 - self.weight) * llm.clamp(min=-1e30) + self.weight * ctc.clamp(min=-1e30)
        return torch.where(torch.isfinite(llm) & torch.isfinite(ctc), joint, -math.inf).float()

    def _state(self, clip: int, prefix: tuple[int, ...]):
        """A prefix's forward variables: from the last step's extensions, else rebuilt label by label."""
        key = (clip,) + prefix
        if key not in self.states:
            r_n, r_b, psi = self.scores.initial(clip)
            for i, label in enumerate(prefix):
                last = prefix[i - 1] if i else -1
                n, b, p = self.scores.extend([clip], r_n[None], r_b[None], [last], torch.tensor([[label]]))
                r_n, r_b, psi = n[0, 0], b[0, 0], float(p[0, 0])
            self.states[key] = (r_n, r_b, psi)
        return self.states[key]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.float().log_softmax(-1)
        out = torch.full_like(logp, -math.inf)
        rows = input_ids.tolist()
        live = [(i, tuple(r)) for i, r in enumerate(rows) if self.eos not in r]
        for i, r in enumerate(rows):
            if self.eos in r:
                out[i] = logp[i]
        if not live:
            return out
        idx = torch.tensor([i for i, _ in live])
        clips = [i // self.rows_per_clip for i, _ in live]
        states = [self._state(c, p) for c, (_, p) in zip(clips, live)]
        r_n = torch.stack([s[0] for s in states])
        r_b = torch.stack([s[1] for s in states])
        psi_g = torch.tensor([s[2] for s in states], dtype=torch.float64)
        k = min(self.k, logp.shape[-1])
        top = logp[idx].topk(k, -1).indices.cpu()
        labels = torch.where(top == self.eos, top.new_tensor(-2), top)         # EOS is scored apart
        new_n, new_b, psi = self.scores.extend(clips, r_n, r_b, [p[-1] if p else -1 for _, p in live],
                                               labels.clamp(min=0))
        psi = torch.where(labels < 0, -math.inf, psi)
        ended = torch.logaddexp(r_n[:, -1], r_b[:, -1])                        # all of g, nothing more
        joint = self._mix(logp[idx].gather(1, top.to(logp.device)), psi - psi_g[:, None])
        out[idx.to(out.device)[:, None], top.to(out.device)] = joint.to(out.device)
        out[idx.to(out.device), self.eos] = self._mix(logp[idx, self.eos], ended - psi_g).to(out.device)
        self.states = {}
        for j, (clip, (_, prefix)) in enumerate(zip(clips, live)):
            for c in range(k):
                if labels[j, c] >= 0:
                    self.states[(clip,) + prefix + (int(labels[j, c]),)] = (new_n[j, c], new_b[j, c], float(psi[j, c]))
        return out
