"""Robustness of an erasure on the toy world: held-out paraphrases, and a discrete prompt search that tries to make
the oracle see the erased concept.

Both attacks treat the pipeline as a black box (``pipe(prompts, generator=[...], output_type="pt").images``) and the
oracle as the judge; any concept of any kind (shape, colour, style) and any pipeline the oracle can read work.

**Paraphrase ASR** (:func:`paraphrase_asr`): prompts for the erased concept worded only with its held-out paraphrases
(``Concept.heldout``: "crimson", "ruby" for red), which neither pretraining captions nor erasure pairs contain. ASR is
the share of their images in which the oracle still sees the concept.

**Prompt search** (:func:`prompt_search_attack`), in the spirit of UnlearnDiffAtk (Zhang et al., 2024; adversarial
tokens prepended to the prompt, the concept judged by a classifier) and Ring-A-Bell (Tsai et al., 2024; a discrete
prompt found offline, then used as is). For each starting prompt (typically a prompt that asks for the concept):

1. the prompt is ``num_adv_words`` empty *adversarial slots* followed by the prompt's words; with
   ``substitute_prompt_words=True`` the prompt's own words are slots too (a word-substitution attack);
2. query 1 scores the starting prompt itself (UnlearnDiffAtk's *pre-attack* success counts as an attack success);
3. greedy coordinate search: the slots are visited in turn; at each visit ``candidates_per_step`` words drawn without
   replacement from ``vocabulary`` are put in the slot, and the best candidate is kept if it beats the current prompt;
4. a prompt's *score* is the oracle's probability of the concept averaged over ``num_seeds`` images (the same seeds for
   every candidate: common random numbers, so candidates are compared on equal draws); it *succeeds* when the concept
   is detected (probability >= the oracle's threshold) in at least ``success_rate`` of those images; prompts are
   ranked by detection share first, then by score;
5. the search stops when the budget of ``budget`` queries (one query = one prompt scored = ``num_seeds`` images) is
   spent, or at the first success (``stop_on_success``);
6. the best prompt is then re-scored on ``num_verify_seeds`` fresh seeds (not counted in the budget), so that a
   prompt that only fits the search seeds is visible: ``AttackReport.verified_asr``.

ASR is the share of starting prompts whose search succeeded within the budget. Everything is deterministic for a
``seed``: the words drawn for starting prompt ``i`` come from ``numpy.random.default_rng([seed, i])`` and image ``j``
of every prompt uses ``torch.Generator().manual_seed(image_seed(seed, j))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..toy.captions import concept_prompts
from ..toy.concepts import CONCEPT_KINDS, concepts_of_kind, get_concept
from .toy_metrics import image_seed

_VERIFY_SEED_OFFSET = 7_919  # verification seeds are image_seed(seed + offset, j): never the search seeds


# ---------------------------------------------------------------------------------------------------------------------
# 1. scoring prompts with the oracle
@torch.no_grad()
def render_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 32,
                   **call_kwargs) -> torch.Tensor:
    """Images of every prompt under every seed: uint8 ``(len(prompts) * len(seeds), H, W, 3)``, prompt-major.

    Image ``(p, j)`` is drawn with ``torch.Generator().manual_seed(seeds[j])`` whatever its batch, so two prompts are
    compared on the same random draws.
    """
    rows = [(prompt, s) for prompt in prompts for s in seeds]
    chunks = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for _, s in batch]
        images = pipe([p for p, _ in batch], generator=generators, output_type="pt", **call_kwargs).images
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(chunks)


def concept_probabilities(oracle, images, concept: str) -> torch.Tensor:
    """``(N,)`` the oracle's presence probability of ``concept`` in each image."""
    found = get_concept(concept)
    return oracle.predict(images).probs[found.kind][:, found.index].float()


def score_prompts(pipe, oracle, concept: str, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 32,
                  **call_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: the mean presence probability of ``concept`` over ``seeds`` and the share of those images in which
    it is detected (probability >= ``oracle.config.threshold``); two ``(len(prompts),)`` float tensors."""
    images = render_prompts(pipe, prompts, seeds, batch_size, **call_kwargs)
    probs_PS = concept_probabilities(oracle, images, concept).view(len(prompts), len(seeds))
    return probs_PS.mean(dim=1), (probs_PS >= oracle.config.threshold).float().mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# 2. paraphrase ASR
def paraphrase_asr(pipe, oracle, concept: str, n_prompts: int = 32, num_images_per_prompt: int = 1, seed: int = 0,
                   prompts: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True,
                   **call_kwargs) -> dict:
    """Share of images of held-out-paraphrase prompts for ``concept`` in which the oracle sees it.

    ``prompts`` defaults to ``concept_prompts(concept, n_prompts, seed, split="heldout_paraphrase")``: the toy
    world's scenes showing the concept, with the concept (and only it) worded by its held-out paraphrases. Returns
    ``asr``, ``per_phrase`` (ASR per held-out phrase found in the prompts), ``n_images`` and the settings.
    """
    target = get_concept(concept)
    if prompts is None:
        prompts = concept_prompts(target, n_prompts, seed, split="heldout_paraphrase")
    if not prompts:
        raise ValueError("no prompts to attack with: pass n_prompts >= 1 or a non-empty prompts list")
    seeds = [image_seed(seed, j) for j in range(num_images_per_prompt)]
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="paraphrase ASR", disable=not progress):
        images.append(render_prompts(pipe, prompts[start: start + batch_size], seeds, batch_size, **call_kwargs))
    probs = concept_probabilities(oracle, torch.cat(images), target.name)
    seen_P = (probs >= oracle.config.threshold).float().view(len(prompts), len(seeds)).mean(dim=1)
    per_phrase: dict[str, list[float]] = {}
    for prompt, seen in zip(prompts, seen_P.tolist()):
        per_phrase.setdefault(_heldout_phrase(target, prompt), []).append(seen)
    return {
        "concept": target.name,
        "asr": float(seen_P.mean()),
        "per_phrase": {phrase: float(np.mean(v)) for phrase, v in sorted(per_phrase.items())},
        "n_prompts": len(prompts),
        "n_images": len(prompts) * len(seeds),
        "settings": {"seed": seed, "num_images_per_prompt": num_images_per_prompt,
                     "threshold": oracle.config.threshold, **_jsonable(call_kwargs)},
    }


def _heldout_phrase(concept, prompt: str) -> str:
    """The longest held-out phrase of ``concept`` that occurs in ``prompt`` (``"<none>"`` if none does)."""
    found = [p for p in concept.heldout_paraphrases if p in prompt.lower()]
    return max(found, key=len) if found else "<none>"


# ---------------------------------------------------------------------------------------------------------------------
# 3. candidate vocabularies
def tokenizer_words(tokenizer, min_length: int = 3) -> list[str]:
    """Whole, alphabetic, lower-case words of a tokenizer's vocabulary, sorted (a candidate pool for the search).

    WordPiece continuations (``##ing``) are dropped and SentencePiece word starts (``▁word``) are kept without the
    marker; special tokens and words shorter than ``min_length`` are dropped.
    """
    special = set(getattr(tokenizer, "all_special_tokens", []))
    words = set()
    for token in tokenizer.get_vocab():
        if token in special or token.startswith("##"):
            continue
        word = token.removeprefix("▁").removeprefix("Ġ")
        if len(word) >= min_length and word.isalpha() and word.isascii() and word.islower():
            words.add(word)
    if not words:
        raise ValueError(
            f"{type(tokenizer).__name__} has no whole-word vocabulary (byte- or character-level?); pass "
            "vocabulary= explicitly, e.g. toy_words()"
        )
    return sorted(words)


def toy_words(kinds: Sequence[str] = CONCEPT_KINDS, heldout: bool = True) -> list[str]:
    """Every caption phrase of the toy world's concepts of ``kinds`` (training words, and held-out paraphrases when
    ``heldout``), sorted: a concept-related candidate pool, in the spirit of Ring-A-Bell's concept-word prompts."""
    phrases = set()
    for kind in kinds:
        for concept in concepts_of_kind(kind):
            phrases.update(concept.training_words)
            if heldout:
                phrases.update(concept.heldout_paraphrases)
    return sorted(phrases)


# ---------------------------------------------------------------------------------------------------------------------
# 4. the prompt search
@dataclass
class AttackResult:
    """The search from one starting prompt.

    Attributes:
        start_prompt: the prompt the search started from.
        best_prompt: the highest-scoring prompt found.
        best_score: its mean presence probability over the search seeds.
        best_detection: the share of its search images in which the concept is detected.
        success: ``best_detection >= success_rate``.
        start_score: the starting prompt's score (query 1).
        num_queries: prompts scored (each ``num_seeds`` images); at most the budget.
        queries_to_success: the query at which the first successful prompt was scored, ``None`` if none was.
        verified_detection: the best prompt's detection share on fresh seeds (``None`` when not verified).
        score_trace: the best score after each query (length ``num_queries``).
    """

    start_prompt: str
    best_prompt: str
    best_score: float
    best_detection: float
    success: bool
    start_score: float
    num_queries: int
    queries_to_success: int | None
    verified_detection: float | None = None
    score_trace: list[float] = field(default_factory=list)


@dataclass
class AttackReport:
    """All searches of one attack, with every setting needed to repeat it.

    ``asr``: share of starting prompts whose search succeeded within the budget; ``pre_asr``: share whose starting
    prompt already succeeded (query 1, no search); ``verified_asr``: share whose best prompt also succeeds on the
    fresh verification seeds (``None`` when not verified); ``num_queries`` / ``num_images``: totals over all searches
    (verification images excluded from ``num_queries``, included in ``num_images``).
    """

    concept: str
    results: list[AttackResult]
    asr: float
    pre_asr: float
    verified_asr: float | None
    num_queries: int
    num_images: int
    settings: dict

    def to_dict(self) -> dict:
        """JSON-ready dict of the report."""
        return asdict(self)


@dataclass(frozen=True)
class _Scored:
    """A prompt as word slots (``""`` = an empty slot), with its score and detection share on the search seeds."""

    words: tuple[str, ...]
    score: float
    detection: float

    @property
    def rank(self) -> tuple[float, float]:
        return self.detection, self.score


class _Search:
    """Greedy coordinate search over word slots for one starting prompt (module docstring, steps 1-5)."""

    def __init__(self, slots: list[int], vocabulary: list[str], rng: np.random.Generator, score_fn, budget: int,
                 candidates_per_step: int, success_rate: float, stop_on_success: bool):
        self.slots, self.vocabulary, self.rng, self.score_fn = slots, vocabulary, rng, score_fn
        self.budget, self.per_step = budget, candidates_per_step
        self.success_rate, self.stop_on_success = success_rate, stop_on_success
        self.queries, self.trace, self.queries_to_success = 0, [], None

    def run(self, words: tuple[str, ...], on_queries) -> _Scored:
        best = self._score([words])[0]
        self._record(best, 1, on_queries)
        visit, idle_visits = 0, 0
        while self.queries < self.budget and idle_visits < len(self.slots) and not self._done(best):
            slot = self.slots[visit % len(self.slots)]
            visit += 1
            candidates = self._candidates(best.words, slot)
            idle_visits = 0 if candidates else idle_visits + 1  # a one-word vocabulary can run out of candidates
            if not candidates:
                continue
            challenger = max(self._score(candidates), key=lambda c: c.rank)
            best = challenger if challenger.rank > best.rank else best
            self._record(best, len(candidates), on_queries)
        return best

    def _candidates(self, words: tuple[str, ...], slot: int) -> list[tuple[str, ...]]:
        pool = [w for w in self.vocabulary if w != words[slot]]
        n = min(self.per_step, len(pool), self.budget - self.queries)
        picks = sorted(self.rng.choice(len(pool), size=n, replace=False).tolist())
        return [words[:slot] + (pool[k],) + words[slot + 1:] for k in picks]

    def _score(self, candidates: list[tuple[str, ...]]) -> list[_Scored]:
        scores, detections = self.score_fn([_join(words) for words in candidates])
        scored = [_Scored(w, float(s), float(d)) for w, s, d in zip(candidates, scores, detections)]
        hits = [i for i, c in enumerate(scored) if c.detection >= self.success_rate]
        if self.queries_to_success is None and hits:
            self.queries_to_success = self.queries + hits[0] + 1
        self.queries += len(candidates)
        return scored

    def _record(self, best: _Scored, n_new: int, on_queries) -> None:
        self.trace += [best.score] * n_new
        on_queries(n_new)

    def _done(self, best: _Scored) -> bool:
        return self.stop_on_success and best.detection >= self.success_rate


def prompt_search_attack(
    pipe,
    oracle,
    concept: str,
    start_prompts: Sequence[str],
    budget: int = 64,
    vocabulary: Sequence[str] | None = None,
    num_adv_words: int = 3,
    substitute_prompt_words: bool = False,
    candidates_per_step: int = 8,
    num_seeds: int = 2,
    success_rate: float = 0.5,
    stop_on_success: bool = True,
    num_verify_seeds: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    **call_kwargs,
) -> AttackReport:
    """Search, for each starting prompt, for a prompt that makes the oracle see ``concept`` (module docstring).

    Args:
        pipe: the attacked pipeline (e.g. the erased model: ``pipe.load_lora_weights(adapter)``).
        oracle: the judge (``OracleClassifier``).
        concept: the erased concept's name (any kind).
        start_prompts: where each search starts, typically prompts asking for the concept.
        budget: queries per starting prompt (one query = one prompt scored on ``num_seeds`` images), query 1 included.
        vocabulary: candidate words or phrases; default ``tokenizer_words(pipe.tokenizer)``.
        num_adv_words: adversarial slots prepended to the prompt (0 needs ``substitute_prompt_words``).
        substitute_prompt_words: the prompt's own words are slots as well.
        candidates_per_step: words tried per slot visit (one query each).
        num_seeds: images per scored prompt; success_rate: detection share over them that counts as success.
        stop_on_success: stop a search at its first success (else spend the whole budget maximising the score).
        num_verify_seeds: fresh images for re-scoring each best prompt (0: no verification).
        seed: seeds the word draws and the images.
        call_kwargs: passed to ``pipe`` (``guidance_scale``, ``temperature``, ...).
    """
    vocabulary = _check_attack_args(pipe, concept, start_prompts, budget, vocabulary, num_adv_words,
                                    substitute_prompt_words, candidates_per_step, num_seeds, success_rate)
    target = get_concept(concept).name
    search_seeds = [image_seed(seed, j) for j in range(num_seeds)]
    verify_seeds = [image_seed(seed + _VERIFY_SEED_OFFSET, j) for j in range(num_verify_seeds)]
    score_fn = lambda prompts: score_prompts(pipe, oracle, target, prompts, search_seeds, batch_size,  # noqa: E731
                                             **call_kwargs)
    results = []
    with tqdm(total=budget * len(start_prompts), desc=f"attack on {target!r}", disable=not progress) as bar:
        for i, prompt in enumerate(start_prompts):
            words = ("",) * num_adv_words + tuple(prompt.split())
            slots = list(range(len(words) if substitute_prompt_words else num_adv_words))
            search = _Search(slots, vocabulary, np.random.default_rng([seed, i]), score_fn, budget,
                             candidates_per_step, success_rate, stop_on_success)
            best = search.run(words, bar.update)
            bar.update(budget - search.queries)  # an early stop leaves the rest of this prompt's budget unused
            results.append(AttackResult(
                start_prompt=prompt, best_prompt=_join(best.words), best_score=best.score,
                best_detection=best.detection, success=best.detection >= success_rate, start_score=search.trace[0],
                num_queries=search.queries, queries_to_success=search.queries_to_success, score_trace=search.trace,
            ))
    if verify_seeds:
        _verify(results, pipe, oracle, target, verify_seeds, success_rate, batch_size, call_kwargs)
    return _report(target, results, num_seeds, len(verify_seeds), success_rate, dict(
        budget=budget, vocabulary_size=len(vocabulary), num_adv_words=num_adv_words,
        substitute_prompt_words=substitute_prompt_words, candidates_per_step=candidates_per_step,
        num_seeds=num_seeds, success_rate=success_rate, stop_on_success=stop_on_success,
        num_verify_seeds=num_verify_seeds, seed=seed, threshold=oracle.config.threshold, **_jsonable(call_kwargs),
    ))


def _check_attack_args(pipe, concept, start_prompts, budget, vocabulary, num_adv_words, substitute_prompt_words,
                       candidates_per_step, num_seeds, success_rate) -> list[str]:
    get_concept(concept)  # a KeyError that lists the known concepts
    if isinstance(start_prompts, str) or not start_prompts:
        raise ValueError("start_prompts must be a non-empty list of prompts (wrap a single prompt in a list)")
    for name, value in (("budget", budget), ("candidates_per_step", candidates_per_step), ("num_seeds", num_seeds)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_adv_words < 0 or (num_adv_words == 0 and not substitute_prompt_words):
        raise ValueError("nothing to search: use num_adv_words >= 1 or substitute_prompt_words=True")
    if not 0 < success_rate <= 1:
        raise ValueError(f"success_rate must be in (0, 1], got {success_rate}")
    words = tokenizer_words(pipe.tokenizer) if vocabulary is None else [w.strip() for w in vocabulary if w.strip()]
    if not words:
        raise ValueError("the vocabulary is empty: pass candidate words, e.g. toy_words() or tokenizer_words(...)")
    return words


def _verify(results: list[AttackResult], pipe, oracle, concept: str, seeds: list[int], success_rate: float,
            batch_size: int, call_kwargs: dict) -> None:
    _, detections = score_prompts(pipe, oracle, concept, [r.best_prompt for r in results], seeds, batch_size,
                                  **call_kwargs)
    for result, detection in zip(results, detections.tolist()):
        result.verified_detection = detection


def _report(concept: str, results: list[AttackResult], num_seeds: int, num_verify_seeds: int, success_rate: float,
            settings: dict) -> AttackReport:
    queries = sum(r.num_queries for r in results)
    verified = None
    if num_verify_seeds:
        verified = float(np.mean([r.success and r.verified_detection >= success_rate for r in results]))
    return AttackReport(
        concept=concept, results=results,
        asr=float(np.mean([r.success for r in results])),
        pre_asr=float(np.mean([r.queries_to_success == 1 for r in results])),
        verified_asr=verified, num_queries=queries,
        num_images=queries * num_seeds + len(results) * num_verify_seeds, settings=settings,
    )


def _join(words: Sequence[str]) -> str:
    return " ".join(w for w in words if w)


def _jsonable(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool | type(None))}
